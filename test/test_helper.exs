# Slow suites (`:stress`) are excluded from a plain `mix test`; CI includes them.
# Tests never touch the user's real cache.
cache = Path.join(System.tmp_dir!(), "capsid-test-cache-#{System.unique_integer([:positive])}")
Application.put_env(:capsid, :cache_dir, cache)

ExUnit.start(exclude: [:stress])
ExUnit.after_suite(fn _ -> File.rm_rf(cache) end)
