class Cassette: pass
class CassetteMiss(LookupError): pass
