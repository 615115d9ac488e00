# Slow suites are excluded from a plain `mix test`; `make test` (CI) includes
# them: `:stress`, and `:integration` (a fresh application depending on
# Capsid, built and run: minutes).
# Tests never touch the user's real cache.
cache = Path.join(System.tmp_dir!(), "capsid-test-cache-#{System.unique_integer([:positive])}")
Application.put_env(:capsid, :cache_dir, cache)

# The hostile fixtures' wat2wasm tool, built here (once; seconds when it is
# up to date) rather than inside the first test that needs it, whose
# timeout a cold build on a busy machine can exceed.
Capsid.Hostile.wat2wasm!()

ExUnit.start(exclude: [:stress, :integration])
ExUnit.after_suite(fn _ -> File.rm_rf(cache) end)
