defmodule Capsid.NodeLimitsTest do
  @moduledoc """
  Node-wide limits set through the application environment: component size,
  concurrent compilations, the atom budget over all components, and a cache
  directory that cannot be used. Not async: these change the environment.
  """
  use ExUnit.Case, async: false

  alias Capsid.{Error, Hostile}

  defp with_env(key, value, fun) do
    old = Application.fetch_env(:capsid, key)
    Application.put_env(:capsid, key, value)

    try do
      fun.()
    after
      case old do
        {:ok, v} -> Application.put_env(:capsid, key, v)
        :error -> Application.delete_env(:capsid, key)
      end
    end
  end

  test "a component over max_component_bytes is refused, as bytes and as a file" do
    path = Capsid.Guests.path(:toolkit)

    with_env(:max_component_bytes, 10_000, fn ->
      assert {:error, %Error{kind: :resource_limit, message: m}} =
               Capsid.Component.load(File.read!(path), cache: false)

      assert m =~ "max_component_bytes"

      assert {:error, %Error{kind: :resource_limit, message: m}} = Capsid.Component.load(path)
      assert m =~ "max_component_bytes"
    end)
  end

  @tag timeout: 300_000
  test "compilations beyond max_concurrent_compiles wait for a slot" do
    bytes = File.read!(Capsid.Guests.path(:toolkit))
    variants = for i <- 1..4, do: custom(bytes, i)

    with_env(:max_concurrent_compiles, 1, fn ->
      watcher =
        Task.async(fn -> peak_compiling(0, System.monotonic_time(:millisecond) + 60_000) end)

      loads = for v <- variants, do: Task.async(fn -> Capsid.Component.load(v, cache: false) end)
      results = Enum.map(loads, &Task.await(&1, 120_000))
      send(watcher.pid, :stop)
      peak = Task.await(watcher)

      assert Enum.all?(results, &match?({:ok, _}, &1))
      assert peak == 1
    end)
  end

  # A custom section named "pad" changes the bytes (and the hash) without
  # changing the component.
  defp custom(bytes, i), do: bytes <> <<0, 5, 3, ?p, ?a, ?d, i>>

  defp peak_compiling(peak, until) do
    receive do
      :stop -> peak
    after
      1 ->
        peak = max(peak, Capsid.info().compiling)
        if System.monotonic_time(:millisecond) < until, do: peak_compiling(peak, until), else: peak
    end
  end

  test "the atom budget over all components is enforced" do
    created = Capsid.info().atoms_created

    with_env(:max_atoms_total, created + 100, fn ->
      assert {:error, %Error{kind: :resource_limit, message: m}} =
               Capsid.Component.load(Hostile.record_bomb(3_000), cache: false)

      assert m =~ "max_atoms_total"
    end)
  end

  @tag :tmp_dir
  test "a cache directory that cannot be used means no cache and one warning, never a failed load",
       %{tmp_dir: dir} do
    bytes = File.read!(Capsid.Guests.path(:greeter_v1))
    not_a_dir = Path.join(dir, "file")
    File.write!(not_a_dir, "x")
    shared = Path.join(dir, "shared")
    File.mkdir_p!(shared)
    File.chmod!(shared, 0o777)

    for cache <- [not_a_dir, Path.join(not_a_dir, "below"), shared] do
      log =
        ExUnit.CaptureLog.capture_log(fn ->
          assert {:ok, %{cache: :disabled}} = Capsid.Component.load(bytes, cache: cache)
          assert {:ok, %{cache: :disabled}} = Capsid.Component.load(bytes, cache: cache)
        end)

      assert log =~ "not caching compiled components"
      assert length(String.split(log, "not caching")) <= 2, "warned more than once: #{log}"
    end

    refute File.exists?(Path.join(shared, ".capsid-cache-key"))
  end

  # Here, not in the async hostile tests: counting atoms needs a quiet VM.
  test "calls create no atoms, and neither do rejected calls" do
    {:ok, c} = Capsid.Component.load(Hostile.record_bomb(2_000), cache: false)
    {:ok, i} = Capsid.Instance.start_link(component: c)
    before = :erlang.system_info(:atom_count)
    assert {:ok, record} = Capsid.call(i, "give", [])
    assert map_size(record) == 2_000
    assert {:error, %Error{kind: :bad_argument}} = Capsid.call(i, "take", [%{}])
    assert {:error, %Error{kind: :bad_argument}} = Capsid.call(i, "take", [%{x: 1}])
    assert {:ok, 7} = Capsid.call(i, "take", [record])
    assert :erlang.system_info(:atom_count) == before
  end
end
