"""A LoRA tag names a file in the LoRA folder, never one outside it."""

from __future__ import annotations

import pytest

from ldm_cli.core.errors import UserError
from ldm_cli.networks.files import find_lora


@pytest.mark.parametrize("name", ["../ink", "sub/../../ink", "/tmp/ink"])
def test_a_tag_that_leads_out_of_the_folder_is_refused(tmp_path, name):
    folder = tmp_path / "loras"
    folder.mkdir()
    (tmp_path / "ink.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="outside"):
        find_lora(name, folder)


def test_subfolders_and_links_inside_the_folder_are_found(tmp_path):
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(b"")
    (folder / "styles" / "ink.safetensors").symlink_to(elsewhere)
    assert find_lora("styles/ink", folder) == folder / "styles" / "ink.safetensors"
    assert find_lora("ink", folder) == folder / "styles" / "ink.safetensors"
    assert find_lora("styles/./ink", folder).name == "ink.safetensors"
