"""Built-in benchmark data: the fictitious people and the world facts used by the demo."""
