defmodule Capsid.CacheTest do
  use ExUnit.Case, async: true

  alias Capsid.Component
  import Capsid.TestHelpers

  setup do
    dir = Path.join(System.tmp_dir!(), "capsid-cache-#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm_rf(dir) end)
    %{dir: dir, bytes: File.read!(Capsid.Guests.path(:toolkit))}
  end

  defp artifact(dir), do: dir |> Path.join("*.cwasm") |> Path.wildcard() |> hd()

  test "the second load of the same bytes comes from the cache, without compiling", %{
    dir: dir,
    bytes: bytes
  } do
    assert %Component{cache: :miss} = first = Component.load!(bytes, cache: dir)
    {micros, second} = :timer.tc(fn -> Component.load!(bytes, cache: dir) end)
    assert second.cache == :hit
    assert second.hash == first.hash
    assert second.exports == first.exports
    # A cached load maps the artifact; it does not run the compiler.
    assert micros < 1_000_000

    pid = start_toolkit(component: second)

    assert Capsid.call(pid, "add", [2, 3]) == {:ok, 5}
  end

  test "a corrupted artifact is rejected, rebuilt, and never loaded", %{dir: dir, bytes: bytes} do
    Component.load!(bytes, cache: dir)
    path = artifact(dir)
    data = File.read!(path)
    # Flip one byte in the middle of the compiled code.
    mid = div(byte_size(data), 2)
    <<head::binary-size(mid), b, tail::binary>> = data
    File.write!(path, <<head::binary, Bitwise.bxor(b, 0xFF), tail::binary>>)

    assert %Component{cache: :rejected} = c = Component.load!(bytes, cache: dir)
    assert %Component{cache: :hit} = Component.load!(bytes, cache: dir)

    pid = start_toolkit(component: c)

    assert Capsid.call(pid, "add", [2, 3]) == {:ok, 5}
  end

  test "a truncated artifact is rejected and rebuilt", %{dir: dir, bytes: bytes} do
    Component.load!(bytes, cache: dir)
    path = artifact(dir)
    File.write!(path, binary_part(File.read!(path), 0, 100))
    assert %Component{cache: :rejected} = Component.load!(bytes, cache: dir)
    assert %Component{cache: :hit} = Component.load!(bytes, cache: dir)
  end

  test "an artifact signed with another cache's key is rejected", %{dir: dir, bytes: bytes} do
    other = dir <> "-other"
    on_exit(fn -> File.rm_rf(other) end)
    Component.load!(bytes, cache: dir)
    File.mkdir_p!(other)
    # Same engine, same component: only the key differs.
    Component.load!(bytes, cache: other)
    File.cp!(artifact(other), artifact(dir))
    File.rm!(Path.join(other, ".capsid-cache-key"))
    assert %Component{cache: :rejected} = Component.load!(bytes, cache: dir)
  end

  test "cache: false compiles every time", %{bytes: bytes} do
    assert %Component{cache: :disabled} = Component.load!(bytes, cache: false)
  end

  test "the cache key file is private", %{dir: dir, bytes: bytes} do
    Component.load!(bytes, cache: dir)
    %File.Stat{mode: mode} = File.stat!(Path.join(dir, ".capsid-cache-key"))
    assert Bitwise.band(mode, 0o077) == 0
  end
end
