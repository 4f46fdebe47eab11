"""The supervisor: creates and owns a run's shared resources, launches and watches every process,
and on any exit stops them and unlinks everything."""
