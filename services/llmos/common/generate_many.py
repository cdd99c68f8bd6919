"""What both ends of `WorkerService/GenerateMany` agree on: the method, and the initial metadata a
worker answers it with (the version of the call it speaks: 2 takes windows and `PiecesTaken`)."""

METHOD = "/llmos.v1.WorkerService/GenerateMany"
CAPABILITY_KEY = "llmos-generate-many"
VERSION = 2
