"""Declare this regional stack's inference endpoints from the endpoints table."""
from gco_infra.program import main

main()
