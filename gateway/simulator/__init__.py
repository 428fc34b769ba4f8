"""``kgate simulate``: a fake model server speaking the five provider wire formats."""
