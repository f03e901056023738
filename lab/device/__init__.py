"""What the hardware can do and how a run uses it: backend tables and detection (hardware), the
device table and precision decisions (capability), the speed plan and memory estimate (speed),
and N processes through `accelerate launch` (launch). Data and detection only: nothing here
imports the pipeline above it."""
