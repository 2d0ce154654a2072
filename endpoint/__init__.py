"""dlhub.endpoint: the endpoint daemon, its Parsl-provisioned pools and the worker runtime."""
