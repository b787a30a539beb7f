"""The built-in demo: a synthetic shapes dataset that knows every object, its small CNN, the demo job."""
