"""Each local instance keeps its API token and CA in its own owner-only directory, keyed by its API port
or ``--state-dir``; a second instance on the same one is refused before it writes anything, and
``kvcompose remote`` finds the directory of the instance it dials. (Two whole instances side by
side: ``test_local_instances.py``.)"""

from __future__ import annotations

import os
import stat

import pytest

from service.local_ca import LocalCA
from service.serve import instance


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_instances_on_other_ports_get_other_directories_and_clients_find_theirs(cache_home, tmp_path):
    a, b = instance.state_dir(9000), instance.state_dir(9100)
    assert a != b and a.parent == b.parent == cache_home / "kvcompose" / "instances"
    assert instance.for_address("127.0.0.1:9000") == a
    assert instance.for_address("localhost:9100") == b
    assert instance.for_address("[::1]:9100") == b
    assert instance.for_address("10.0.0.7:9000") is None  # another host: no local secrets
    assert instance.for_address("10.0.0.7:9000", tmp_path / "mine") == tmp_path / "mine"
    assert instance.state_dir(9000, tmp_path / "mine") == tmp_path / "mine"


def test_a_claimed_directory_is_owner_only_exclusive_and_emptied_at_the_end(tmp_path):
    state = instance.state_dir(9000)
    with instance.claimed(state):
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(state.parent).st_mode) == 0o700
        instance.api_token_file(state).write_text("token")
        LocalCA.create().issue(instance.tls_dir(state) / "server")
        key = instance.tls_dir(state) / "server" / "tls.key"
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(key.parent).st_mode) == 0o700
        with pytest.raises(ValueError, match="another kvcompose serve is running with state directory"):
            with instance.claimed(state):
                pass
        assert instance.api_token_file(state).read_text() == "token"  # the refused one touched nothing
    assert not state.exists()
    with instance.claimed(state):  # free again once the first has ended
        pass

    given = tmp_path / "given"
    given.mkdir(mode=0o755)
    (given / "notes").write_text("mine")
    with instance.claimed(given):
        assert stat.S_IMODE(os.stat(given).st_mode) == 0o700
        instance.api_token_file(given).write_text("token")
    assert sorted(p.name for p in given.iterdir()) == ["notes"]  # only the secrets go; the user's dir stays
