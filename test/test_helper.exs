# Slow suites (`:stress`) are excluded from a plain `mix test`; CI includes them.
ExUnit.start(exclude: [:stress])
