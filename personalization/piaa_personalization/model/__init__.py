"""The personalization math (pure numpy, no I/O): the residual model and active learning."""
