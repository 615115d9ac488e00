defmodule Capsid.ForeignTest do
  @moduledoc """
  A component Capsid did not build: CPython inside, made by componentize-py
  (see test/fixtures/foreign/README.md), with an exported interface and
  WASI 0.2.9 imports.
  """
  use ExUnit.Case, async: true

  @path Path.expand("../fixtures/foreign/calc_py.wasm", __DIR__)

  setup_all do
    # ~18 MB: compiled once for the module.
    component = Capsid.Component.load!(@path)
    {:ok, pid} = Capsid.Instance.start_link(component: component)
    %{component: component, pid: pid}
  end

  test "exports its interface with WIT types", %{component: c} do
    stats = Enum.find(Capsid.Component.exports(c), &(&1.name == "foreign:calc/math@1.0.0#stats"))
    assert stats.params == [{"xs", {:list, :f64}}]
    assert stats.result == {:record, [{"count", :u32}, {"mean", :f64}, {"max", :f64}]}

    assert c
           |> Capsid.Component.imports()
           |> Enum.map(& &1.interface)
           |> Enum.uniq()
           |> Enum.sort()
           |> hd() =~
             "wasi:"
  end

  test "is callable by short and qualified name", %{pid: pid} do
    assert Capsid.call(pid, "add", [2, 40]) == {:ok, 42}

    assert Capsid.call(pid, "foreign:calc/math@1.0.0#add", [2_147_483_647, 1]) ==
             {:ok, -2_147_483_648}

    assert Capsid.call(pid, "stats", [[1, 2, 4.5]]) == {:ok, %{count: 3, mean: 2.5, max: 4.5}}
    assert Capsid.call(pid, "greet", [nil]) == {:ok, "Hello, stranger!"}
    assert Capsid.call(pid, "safe-div", [1, 0]) == {:ok, {:error, "division by zero"}}
  end

  test "uses WASI, and sees a deny-by-default environment", %{pid: pid} do
    assert {:ok, "Capsid from Python 3." <> _} = Capsid.call(pid, "describe", ["Capsid"])
    System.put_env("CAPSID_FOREIGN_PROBE", "leak?")
    assert Capsid.call(pid, "lookup-env", ["CAPSID_FOREIGN_PROBE"]) == {:ok, nil}
    assert Capsid.call(pid, "lookup-env", ["PATH"]) == {:ok, nil}
  end
end
