# Sourced by demo.sh and test.sh: create .venv in the clone (once) and install the project
# editable with the extras named in $1.
ensure_venv() {
  local extras=$1
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[$extras]"
}
