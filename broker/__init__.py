"""dinet broker."""
