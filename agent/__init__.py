"""dinet agent."""
