"""What crosses a process boundary: the ZeroMQ transport with its message checks
(`transport`), the rendezvous through which roles find each other (`rendezvous`), and which
process plays which role, from the hosts they run on (`placement`)."""
