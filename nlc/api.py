def load(path):  # placeholder replaced below
    raise NotImplementedError
def lower(spec):
    raise NotImplementedError
