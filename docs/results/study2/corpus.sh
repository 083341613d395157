#!/usr/bin/env bash
# Study v2's corpus: Python's standard library (kha's pystdlib source) plus the text of five Debian 12 packages,
# fetched with apt and unpacked here; then `kha data prepare`. Usage: corpus.sh WORK_DIR DATA_DIR
# (e.g. corpus.sh ~/.cache/kha-corpus data/study2). Packages (version, SHA-256 of the .deb):
#   python3.11-doc 3.11.2-6+deb12u8  50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b
#   linux-doc-6.1  6.1.176-1         0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f
#   perl-doc       5.36.0-7+deb12u3  e9e3564ff5ade27de0585835f2acad769bcc545c0a0045a9f55d5401f27f7591
#   git-doc        1:2.39.5-0+deb12u3 3c89668a11053a6bafade3de1f611f4613db31e082af63f43d8c5b69ad8795ec
#   python3-sympy  1.11.1-1          b437232be31819aafd267ddf2132c16293ef75e02fd58b4ad31eee3ef1d5b49e
# kha reads .txt/.md files from a folder, so .gz, .yaml, .pod and .py files are copied with a .txt suffix.
set -euo pipefail
work=$(realpath -m "$1"); data=$2
mkdir -p "$work" && cd "$work"
apt-get download python3.11-doc=3.11.2-6+deb12u8 linux-doc-6.1=6.1.176-1 perl-doc=5.36.0-7+deb12u3 \
    git-doc=1:2.39.5-0+deb12u3 python3-sympy=1.11.1-1
for deb in *.deb; do dpkg-deb -x "$deb" root; done
as_txt() {  # as_txt SRC_DIR DEST_DIR FIND_ARGS...: copy (gunzip) the matching files as DEST/REL.txt
    local src=$1 dest=$2; shift 2
    (cd "$src" && find . -type f "$@" | sort) | while read -r f; do
        out="$dest/${f%.gz}"; out="${out%.txt}.txt"; mkdir -p "$(dirname "$out")"
        case "$f" in *.gz) zcat "$src/$f" > "$out" ;; *) cp "$src/$f" "$out" ;; esac
    done
}
rm -rf linux-doc-text perl-pod sympy-py
as_txt root/usr/share/doc/linux-doc-6.1/Documentation linux-doc-text \( -name '*.txt.gz' -o -name '*.yaml.gz' \)
as_txt root/usr/share/perl/5.36.0/pod perl-pod -name '*.pod'
as_txt root/usr/lib/python3/dist-packages/sympy sympy-py -name '*.py' -not -path '*/tests/*'
cd - > /dev/null
kha data prepare --out "$data" --source pystdlib \
    --source "$work/root/usr/share/doc/python3.11/html/_sources" \
    --source "$work/root/usr/share/doc/linux-doc-6.1/html/_sources" --source "$work/linux-doc-text" \
    --source "$work/root/usr/share/doc/git-doc" --source "$work/perl-pod" --source "$work/sympy-py"
