"""The running parts: producer, consumer, snapshot, replay, dump."""
