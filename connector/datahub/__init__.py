"""The DataHub side, pure: change events to MCPs, stale-entity decisions, aspect JSON, fitting an aspect."""
