"""The checkpoint tools' room (``python -m harness.ckpt``): what grows beyond the command line's
module lives here, one concern per module (sharded_export: streaming a sharded model out)."""
