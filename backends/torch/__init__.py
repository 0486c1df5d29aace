"""The torch backend: reference ops (recurrent and chunked), memory modules, compiled models, optimizers."""
