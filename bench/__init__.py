"""Benchmarks. The stacks they start run as the tests' do (tests/support/identity.py): services
verify the run's development tokens and SDK clients present the `admin` one; raw gRPC clients that
carry no identity are accepted (identities not required) except where a benchmark says otherwise."""

from tests.support.identity import install_session_identity

install_session_identity()
