"""A package, so that pytest puts the repository root (not tests/) first on sys.path: fixtures/, bench/ and the code
under test come from this checkout under a plain `pytest` too. Test modules never import each other
(tests/test_layout.py checks it); what they share lives in fixtures/ and conftest.py."""
