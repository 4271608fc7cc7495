"""The change-event contract: event types, their Avro encoding, the envelope, fitting an event."""
