"""Declare this regional stack's inference endpoints from the endpoints table."""
import pulumi

from gco_infra.program import main, outputs_settled

main()
pulumi.run(outputs_settled)  # awaited once the declarations are made (see outputs_settled)
