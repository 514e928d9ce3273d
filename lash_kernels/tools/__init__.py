"""Tools that work on the ops without running them: :mod:`.aot_check`, the static GPU check, and
:mod:`.aot_args`, its command line's argument types."""
