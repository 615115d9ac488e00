defmodule Capsid.ForeignResourcesTest do
  @moduledoc """
  Resources in a component Capsid did not build: componentize-py's
  `resources_py.wasm` (test/fixtures/foreign/resources_py/README.md) exports
  a `counter` resource and imports a `ledger` that the host implements.
  """
  use ExUnit.Case, async: true

  alias Capsid.{Error, Resource, Trap}

  @path Path.expand("../fixtures/foreign/resources_py/resources_py.wasm", __DIR__)

  setup_all do
    # ~18 MB of CPython: compiled once for the module.
    %{component: Capsid.Component.load!(@path)}
  end

  setup %{component: c} do
    test = self()

    imports = %{
      "[constructor]ledger" => fn name -> %{name: name, entries: :counters.new(1, [])} end,
      "[method]ledger.record" => fn %{entries: e}, entry ->
        send(test, {:recorded, entry})
        :counters.add(e, 1, 1)
        :counters.get(e, 1)
      end,
      "[method]ledger.name" => fn %{name: name} -> name end,
      "[resource-drop]ledger" => fn ledger -> send(test, {:dropped, ledger.name}) end,
      "log" => fn msg -> send(test, {:log, msg}) end
    }

    pid = start_supervised!({Capsid.Instance, component: c, imports: imports}, id: make_ref())
    %{pid: pid}
  end

  defp counter(pid, start) do
    assert {:ok, %Resource{name: "counter"} = c} = Capsid.call(pid, "[constructor]counter", [start])
    c
  end

  test "an exported resource: constructor, methods, static, borrow lists, own", %{pid: pid} do
    live = Capsid.call!(pid, "live", [])
    a = counter(pid, 5)
    b = counter(pid, 7)
    assert Capsid.call(pid, "[method]counter.increment", [a, 10]) == {:ok, 15}
    assert Capsid.call(pid, "[method]counter.value", [b]) == {:ok, 7}
    assert {:ok, %Resource{} = m} = Capsid.call(pid, "[static]counter.merge", [a, b])
    assert Capsid.call(pid, "[method]counter.value", [m]) == {:ok, 22}
    assert Capsid.call(pid, "total", [[a, b, a]]) == {:ok, 37}
    assert Capsid.call!(pid, "live", []) == live + 3
    # own: the guest takes it and releases it (its own count goes down).
    assert Capsid.call(pid, "consume", [b]) == {:ok, 7}
    assert Capsid.call!(pid, "live", []) == live + 2

    assert {:error, %Error{kind: :stale_resource}} = Capsid.call(pid, "[method]counter.value", [b])

    # A host drop runs the guest's destructor; componentize-py 0.25.1 does
    # not tell Python (README, "Drops"), so `live` cannot show it.
    assert Resource.drop(a) == :ok
    assert {:error, %Error{kind: :stale_resource}} = Resource.drop(a)
  end

  test "the imported ledger is implemented in Elixir", %{pid: pid} do
    ledger = %{name: "books", entries: :counters.new(1, [])}
    assert Capsid.call(pid, "audit", [ledger, "one"]) == {:ok, 1}
    assert Capsid.call(pid, "audit", [ledger, "two"]) == {:ok, 2}
    assert_received {:recorded, "one"}
    # Borrowed: the guest does not drop the host's ledger.
    refute_received {:dropped, _}

    # Made by the guest through the host's constructor and handed back as
    # own<ledger>: Elixir has the state again.
    assert {:ok, %{name: "fresh", entries: _}} = Capsid.call(pid, "open-ledger", ["fresh"])
    refute_received {:dropped, _}
  end

  test "a resource method that traps recycles the instance: handles go stale", %{pid: pid} do
    c = counter(pid, 9_223_372_036_854_775_000)

    assert {:error, %Trap{}} = Capsid.call(pid, "[method]counter.increment", [c, 1_000])

    assert {:error, %Error{kind: :stale_resource}} = Capsid.call(pid, "[method]counter.value", [c])

    assert {:ok, _} = Capsid.call(pid, "live", [])
  end

  test "a trap after a host import call", %{pid: pid} do
    assert {:error, %Trap{}} = Capsid.call(pid, "fail", [])
    assert_received {:log, "fail: raising RuntimeError"}
  end
end
