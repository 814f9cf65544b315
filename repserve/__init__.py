"""``repserve``: one command line for the server, training, the HTTP API and official checkpoints.

It sits on top of every other package (``service``, ``training``, ``repadapter``) and holds no logic of its
own beyond parsing arguments and printing results: each command calls the library function that does the job.
"""

__version__ = "0.1.0"
