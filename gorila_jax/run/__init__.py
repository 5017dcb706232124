"""What a user starts: the entry point that gives a process its role (`launch`), the local
launcher (`launcher`), a single process with no server (`single_process`), the evaluation
of saved params (`evaluate`) and the plots of finished runs (`plots`). Nothing in the
package imports this folder."""
