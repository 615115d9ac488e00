defmodule Capsid.EnginesTest do
  @moduledoc """
  The engine choices of `Capsid.Component.load/2`.

  `guard_pages: true`: the component runs on an engine whose memories are
  4 GiB reservations with a guard region and whose code skips bounds
  checks. Every access must give the same answer or the same trap as on the
  default, bounds-checked engine, and the mappings and address space it
  costs must be bounded and given back.

  `fuel_metering: false`: no fuel counting; calls are bounded by time alone,
  and the limits that would need fuel are refused.

  Not async: it reads and changes node-wide counters and limits.
  """
  use ExUnit.Case, async: false

  import Capsid.TestHelpers

  alias Capsid.{Error, Trap}

  @wat Path.expand("../fixtures/hand/guard_pages.wat", __DIR__)
  @page 65_536

  setup_all do
    wasm = Path.join(System.tmp_dir!(), "capsid-guard-#{System.unique_integer([:positive])}.wasm")
    {_, 0} = System.cmd(Capsid.Hostile.wat2wasm!(), [@wat, wasm], stderr_to_stdout: true)
    bytes = File.read!(wasm)
    File.rm!(wasm)

    faulty = Capsid.Guests.path(:faulty)

    %{
      bytes: bytes,
      dense: Capsid.Component.load!(bytes, cache: false),
      guarded: Capsid.Component.load!(bytes, cache: false, guard_pages: true),
      faulty: Capsid.Component.load!(faulty),
      unmetered: Capsid.Component.load!(faulty, fuel_metering: false, guard_pages: true)
    }
  end

  # The faulty guest imports `hook`.
  defp start!(component, opts \\ []) do
    imports = %{"hook" => fn x -> x end}
    {:ok, pid} = Capsid.Instance.start_link([component: component, imports: imports] ++ opts)
    pid
  end

  defp oob?(result), do: match?({:error, %Trap{kind: :memory_out_of_bounds}}, result)

  test "the option is recorded and shown, and a bad value is refused", c do
    assert c.guarded.guard_pages and not c.dense.guard_pages
    assert inspect(c.guarded) =~ "guard pages"
    refute inspect(c.dense) =~ "guard pages"

    assert_raise ArgumentError, ~r/:guard_pages: expected true or false, got :yes/, fn ->
      Capsid.Component.load(c.bytes, guard_pages: :yes)
    end
  end

  test "every access answers or traps the same with and without guard pages", c do
    for component <- [c.dense, c.guarded] do
      pid = start!(component)
      assert Capsid.call(pid, "load", [0]) == {:ok, 0}
      assert Capsid.call(pid, "store", [100, 42]) == {:ok, nil}
      assert Capsid.call(pid, "load", [100]) == {:ok, 42}
      # The last whole word of the one page, then one byte past it.
      assert Capsid.call(pid, "load", [@page - 4]) == {:ok, 0}
      assert oob?(Capsid.call(pid, "load", [@page - 3]))
      # Inside the reservation (protected, not mapped read/write).
      assert oob?(Capsid.call(pid, "load", [@page]))
      assert oob?(Capsid.call(pid, "load", [0x8000_0000]))
      assert oob?(Capsid.call(pid, "load", [0xFFFF_FFFC]))
      # A static offset into the guard region, from the start and the end
      # of the address range; a static offset no guard covers.
      assert oob?(Capsid.call(pid, "load-far", [0]))
      assert oob?(Capsid.call(pid, "load-far", [0xFFFF_FFF0]))
      assert oob?(Capsid.call(pid, "load-huge", [0x8000_0000]))
      assert oob?(Capsid.call(pid, "load-huge", [0]))

      # Growth opens new zeroed pages, and no further.
      assert Capsid.call(pid, "grow", [2]) == {:ok, 1}
      assert Capsid.call(pid, "load", [3 * @page - 4]) == {:ok, 0}
      assert Capsid.call(pid, "store", [3 * @page - 4, 7]) == {:ok, nil}
      assert Capsid.call(pid, "load", [3 * @page - 4]) == {:ok, 7}
      assert Capsid.call(pid, "sum", []) == {:ok, 7}
      assert oob?(Capsid.call(pid, "load", [3 * @page]))
      GenServer.stop(pid)
    end
  end

  test "the memory limit holds on guarded memories", c do
    for component <- [c.dense, c.guarded] do
      pid = start!(component, max_memory: 2 * @page)
      assert Capsid.call(pid, "grow", [1]) == {:ok, 1}
      assert {:error, %Trap{kind: :memory_limit}} = Capsid.call(pid, "grow", [1])
      GenServer.stop(pid)
    end
  end

  test "a state-preserving call keeps a guarded memory across a trap", c do
    pid = start!(c.guarded)
    assert Capsid.call(pid, "grow", [1]) == {:ok, 1}
    assert Capsid.call(pid, "store", [@page + 8, 99]) == {:ok, nil}
    assert oob?(Capsid.Call.call_preserving(pid, "load", [0xFFFF_FFFC]))
    # A new store, with the old store's memory copied in, grown as it was.
    assert Capsid.call(pid, "load", [@page + 8]) == {:ok, 99}
    assert %{recycles: 1} = Capsid.Instance.info(pid)
    GenServer.stop(pid)
  end

  test "each guarded memory costs one mapping and 4 GiB of address space, given back at stop", c do
    before = Capsid.info()
    pids = for _ <- 1..20, do: start!(c.guarded)
    for pid <- pids, do: assert(Capsid.call(pid, "load", [0]) == {:ok, 0})
    during = Capsid.info()
    # One each, and perhaps one more arena chunk for their fiber stacks.
    assert (during.mappings - before.mappings) in 20..21
    reservation = 4 * 1024 ** 3 + 32 * 1024 ** 2
    assert during.address_space_reserved - before.address_space_reserved >= 20 * reservation
    Enum.each(pids, &GenServer.stop/1)
    wait_until(fn -> Capsid.info().mappings <= during.mappings - 20 end)
    after_stop = Capsid.info()
    # Arena chunks stay mapped; the guarded memories are gone.
    assert after_stop.mappings == during.mappings - 20
    assert after_stop.address_space_reserved == during.address_space_reserved - 20 * reservation
  end

  test "a component's 100 memories: refused past max_memories, else 4 GiB each, all given back" do
    {:ok, c} = Capsid.Component.load(Capsid.Hostile.memories(100, 1), guard_pages: true)

    assert {:error, %Error{kind: :resource_limit, message: m}} =
             Capsid.Instance.start_link(component: c)

    assert m =~ "max_memories"

    # Ten instances of it: 1,000 guarded memories, ~4 TiB of address space.
    before = Capsid.info()
    pids = for _ <- 1..10, do: start!(c, max_memories: 100)
    for pid <- pids, do: assert(Capsid.call(pid, "ok", []) == {:ok, 42})
    during = Capsid.info()
    reservation = 4 * 1024 ** 3 + 32 * 1024 ** 2
    assert during.address_space_reserved - before.address_space_reserved >= 1_000 * reservation
    assert during.mappings - before.mappings >= 1_000
    Enum.each(pids, &GenServer.stop/1)
    # An instance's store is freed when the VM frees its dead process's
    # resources, a moment after `stop` returns.
    wait_until(fn -> Capsid.info().mappings <= during.mappings - 1_000 end)
    after_stop = Capsid.info()
    assert after_stop.mappings == during.mappings - 1_000

    assert after_stop.address_space_reserved ==
             during.address_space_reserved - 1_000 * reservation
  end

  defp address_space_limit(bytes),
    do: {:ok, :ok} = Capsid.Native.node_configure([{"address_space_limit", bytes}])

  test "running out of the address-space budget is a clear :resource_limit", c do
    reserved = Capsid.info().address_space_reserved
    # Room for the dense arenas already mapped, not for a 4 GiB reservation.
    address_space_limit(reserved + 1024 ** 3)

    try do
      result = Capsid.Instance.start(component: c.guarded)

      result =
        case result do
          {:ok, pid} -> Capsid.call(pid, "load", [0])
          error -> error
        end

      assert {:error, %Error{kind: :resource_limit, message: message}} = result
      assert message =~ "address_space_limit"
    after
      address_space_limit(Application.get_env(:capsid, :address_space_limit, 16 * 1024 ** 4))
    end

    # With the budget back the same component starts.
    pid = start!(c.guarded)
    assert Capsid.call(pid, "load", [0]) == {:ok, 0}
    GenServer.stop(pid)
  end

  test "a growth the address-space budget refuses is a clear :resource_limit", c do
    # 20,000 pages need a 2 GiB arena slot: a class nothing else here uses,
    # so its first chunk must be mapped, and the budget refuses it.
    pid = start!(c.dense, max_memory: 4 * 1024 ** 3)
    assert Capsid.call(pid, "load", [0]) == {:ok, 0}
    address_space_limit(Capsid.info().address_space_reserved)

    try do
      assert {:error, %Error{kind: :resource_limit, message: message}} =
               Capsid.call(pid, "grow", [20_000])

      assert message =~ "address_space_limit"
    after
      address_space_limit(Application.get_env(:capsid, :address_space_limit, 16 * 1024 ** 4))
    end

    # Nothing lost but that call: the instance answers again, and grows.
    assert Capsid.call(pid, "load", [0]) == {:ok, 0}
    assert Capsid.call(pid, "grow", [20_000]) == {:ok, 1}
    GenServer.stop(pid)
  end

  test "the compile cache keeps the two engines' artifacts apart", c do
    dir = Path.join(System.tmp_dir!(), "capsid-guard-cache-#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm_rf!(dir) end)

    assert %{cache: :miss, guard_pages: false} = Capsid.Component.load!(c.bytes, cache: dir)
    # Not the dense artifact: compiled anew for the guarded engine.
    assert %{cache: :miss} = Capsid.Component.load!(c.bytes, cache: dir, guard_pages: true)
    assert %{cache: :hit} = dense = Capsid.Component.load!(c.bytes, cache: dir)

    assert %{cache: :hit} = guarded = Capsid.Component.load!(c.bytes, cache: dir, guard_pages: true)

    for component <- [dense, guarded] do
      pid = start!(component)
      assert oob?(Capsid.call(pid, "load", [@page]))
      assert Capsid.call(pid, "load", [@page - 4]) == {:ok, 0}
      GenServer.stop(pid)
    end
  end

  test "a deployment loads with guard_pages and upgrades between the engines", c do
    name = {:guard_pages_test, System.unique_integer()}
    assert {:ok, info} = Capsid.deploy(name, c.bytes, size: 1, guard_pages: true, cache: false)
    assert %{version: 1, guard_pages: true} = info.current
    assert oob?(Capsid.call(name, "load", [@page]))
    assert Capsid.call(name, "load", [0]) == {:ok, 0}
    # The same bytes for the other engine are a new version.
    assert {:ok, info} = Capsid.deploy(name, c.bytes, size: 1, guard_pages: false, cache: false)
    assert %{version: 2, guard_pages: false} = info.current
    assert Capsid.call(name, "load", [@page - 4]) == {:ok, 0}

    assert_raise ArgumentError, ~r/:guard_pages/, fn ->
      Capsid.deploy(name, c.bytes, guard_pages: "yes")
    end

    :ok = Capsid.undeploy(name)
  end

  describe "fuel_metering: false" do
    test "is recorded and shown, and a bad value is refused", c do
      refute c.unmetered.fuel_metering
      assert c.faulty.fuel_metering
      assert inspect(c.unmetered) =~ "no fuel metering"

      assert_raise ArgumentError, ~r/:fuel_metering: expected true or false/, fn ->
        Capsid.Component.load(c.bytes, fuel_metering: nil)
      end
    end

    test "calls answer as with metering, count no fuel, and a spinning guest times out", c do
      metered = start!(c.faulty)
      pid = start!(c.unmetered, timeout: 300)
      assert Capsid.call(pid, "burn", [1_000_000]) == Capsid.call(metered, "burn", [1_000_000])
      assert %{fuel_used: 0} = Capsid.Instance.info(pid)
      assert %{fuel_used: used} = Capsid.Instance.info(metered)
      assert used > 1_000_000

      t0 = System.monotonic_time(:millisecond)
      assert {:error, %Trap{kind: :timeout}} = Capsid.call(pid, "spin", [])
      assert System.monotonic_time(:millisecond) - t0 < 5_000
      # A per-call timeout narrows it too.
      assert {:error, %Trap{kind: :timeout}} = Capsid.call(pid, "spin", [], timeout: 50)
      assert Capsid.call(pid, "ok", [1]) == Capsid.call(metered, "ok", [1])
    end

    test "a caller killed while its guest spins frees the instance", c do
      pid = start!(c.unmetered, timeout: 60_000)
      victim = spawn(fn -> Capsid.call(pid, "spin", []) end)
      Process.sleep(100)
      t0 = System.monotonic_time(:millisecond)
      Process.exit(victim, :kill)
      assert Capsid.call(pid, "ok", [1], queue_timeout: 10_000) == {:ok, 2}
      # Freed by the kill, not by the 60 s timeout.
      assert System.monotonic_time(:millisecond) - t0 < 10_000
      assert %{traps: %{cancelled: 1}} = Capsid.Instance.info(pid)
    end

    test "limits that need fuel are refused with a clear error", c do
      assert_raise ArgumentError, ~r/fuel_metering: false, so it has no fuel to limit/, fn ->
        Capsid.Instance.start_link(component: c.unmetered, fuel: 1_000)
      end

      assert_raise ArgumentError, ~r/its timeout is its only bound/, fn ->
        Capsid.Instance.start_link(component: c.unmetered, timeout: :infinity, fuel: :infinity)
      end

      pid = start!(c.unmetered, fuel: :infinity)

      assert {:error, %Error{kind: :bad_argument, message: message}} =
               Capsid.call(pid, "ok", [1], fuel: 10)

      assert message =~ "fuel_metering: false"
      # Nothing was lost: the instance answers, also with fuel: :infinity.
      assert {:ok, _} = Capsid.call(pid, "ok", [1], fuel: :infinity)

      assert_raise ArgumentError, ~r/no fuel to limit/, fn ->
        Capsid.deploy({:engines_test, System.unique_integer()}, c.unmetered, fuel: 5)
      end
    end

    test "the cache keeps metered and unmetered artifacts apart", c do
      dir = Path.join(System.tmp_dir!(), "capsid-fuel-cache-#{System.unique_integer([:positive])}")
      on_exit(fn -> File.rm_rf!(dir) end)
      assert %{cache: :miss} = Capsid.Component.load!(c.bytes, cache: dir)
      assert %{cache: :miss} = Capsid.Component.load!(c.bytes, cache: dir, fuel_metering: false)

      assert %{cache: :hit, fuel_metering: false} =
               unmetered = Capsid.Component.load!(c.bytes, cache: dir, fuel_metering: false)

      pid = start!(unmetered)
      assert Capsid.call(pid, "load", [0]) == {:ok, 0}
      assert %{fuel_used: 0} = Capsid.Instance.info(pid)
    end
  end
end
