"""What crosses a process boundary: the ZeroMQ transport with its message checks
(`transport`) and the rendezvous through which roles find each other (`rendezvous`)."""
