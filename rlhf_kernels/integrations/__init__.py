"""Drop-in use of the ops inside other training libraries (``integrations.trl``)."""
