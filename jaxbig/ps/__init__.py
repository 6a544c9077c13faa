"""A parameter server with asynchronous updates, on Ray actors (`optim.outer=async_ps`, the `ps` config section).

- `driver`: `train_ps(cfg)`, the run: actors up, rounds scheduled under the staleness bound (SSP), logging,
  evaluation, orbax checkpoints of the server state, resuming.
- `server`: `ServerShard`, a Ray actor holding a group of params and their optimizer state; applies pushes.
- `worker`: `Worker`, a Ray actor on its own devices running the run's jitted step; pulls, computes, pushes.
- `cluster`: the local or joined Ray cluster, and starting the actors with their devices and restart policy.
- `setup`: the checks before anything starts, a worker's config and `Run`, the push codec.
- `groups`: params as named tensors and their split over server shards.

Ray is the optional extra `.[ps]` (`make setup` installs it). Import `jaxbig.ps.driver` to train; this package
itself imports nothing heavy.
"""
