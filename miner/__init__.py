"""The subnet-72 miner: a bittensor Axon serving the subnet's ImageSynapse, answered by the cascade (a server URL or
an in-process Engine). `python -m miner --help`; needs the `miner` extra (bittensor 9.x or 10.x)."""
