defmodule Capsid.InstanceTest do
  use ExUnit.Case, async: true

  alias Capsid.{Error, Instance}
  import Capsid.TestHelpers

  doctest Capsid.Instance

  test "runs under a supervisor and by name" do
    name = :"toolkit_#{System.unique_integer([:positive])}"

    children = [
      {Instance, component: toolkit(), imports: toolkit_imports(), name: name}
    ]

    {:ok, sup} = Supervisor.start_link(children, strategy: :one_for_one)
    assert Capsid.call(name, "add", [1, 2]) == {:ok, 3}

    old = Process.whereis(name)
    Process.exit(old, :kill)
    wait_until(fn -> (pid = Process.whereis(name)) && pid != old end)
    assert Capsid.call(name, "add", [2, 2]) == {:ok, 4}
    Supervisor.stop(sup)
    assert {:error, %Error{kind: :instance_down}} = Capsid.call(name, "add", [1, 2])
  end

  test "a dead instance is :instance_down" do
    {:ok, pid} = Instance.start_link(component: toolkit(), imports: toolkit_imports())
    Process.unlink(pid)
    GenServer.stop(pid)
    assert {:error, %Error{kind: :instance_down}} = Capsid.call(pid, "add", [1, 2])
    assert {:error, %Error{kind: :instance_down}} = Capsid.call(:nobody_here, "add", [1, 2])
  end

  test "info counts calls, fuel and instantiations" do
    pid = start_toolkit()
    info = Instance.info(pid)
    assert %{calls: 0, recycles: 0, instantiations: 1} = info
    assert info.limits.timeout == 5_000
    {:ok, _} = Capsid.call(pid, "analyze", ["some words here"])
    {:ok, _} = Capsid.call(pid, "add", [1, 2])
    info = Instance.info(pid)
    assert info.calls == 2
    assert info.fuel_used > 0
    assert info.traps == Map.new(Map.keys(info.traps), &{&1, 0})
  end

  test "bad options raise ArgumentError naming the option" do
    c = toolkit()

    assert_raise ArgumentError, ~r/missing required option :component/, fn ->
      Instance.start_link([])
    end

    assert_raise ArgumentError, ~r/unknown option :fule.*Did you mean :fuel\?/, fn ->
      Instance.start_link(component: c, fule: 10)
    end

    assert_raise ArgumentError,
                 ~r/invalid value for :fuel: expected a non-negative integer or :infinity, got -1/,
                 fn ->
                   Instance.start_link(component: c, fuel: -1)
                 end

    assert_raise ArgumentError, ~r/invalid value for :timeout.*got :soon/, fn ->
      Instance.start_link(component: c, timeout: :soon)
    end

    assert_raise ArgumentError, ~r/:imports/, fn ->
      Instance.start_link(component: c, imports: [1])
    end

    pid = start_toolkit()

    assert_raise ArgumentError, ~r/unknown option :fuell.*Did you mean :fuel/, fn ->
      Capsid.call(pid, "add", [1, 2], fuell: 1)
    end
  end
end
