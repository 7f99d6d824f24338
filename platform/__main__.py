"""The platform stack: the endpoints table, state bucket and key, IAM roles, and each cluster's gco-system."""
from gco_infra.platform_stack import main

main()
