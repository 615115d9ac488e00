defmodule Capsid.HostileFixturesTest do
  @moduledoc """
  The hostile fixtures (`Capsid.Hostile`, test/fixtures/hostile/) are what
  they claim to be: small versions load and behave as documented, the
  default (review-sized) versions are valid components, and the sizes
  documented as over a validation cap are rejected. What Capsid does with
  the big ones is recorded in test/fixtures/hostile/README.md, not asserted
  here.
  """
  use ExUnit.Case, async: true

  alias Capsid.Hostile

  defp load!(bytes) do
    assert :ok = Hostile.validate(bytes)
    assert {:ok, component} = Capsid.Component.load(bytes, cache: false)
    component
  end

  defp start!(component, imports \\ %{}, opts \\ []) do
    opts = [component: component, imports: imports] ++ opts
    start_supervised!(Supervisor.child_spec({Capsid.Instance, opts}, id: make_ref()))
  end

  defp export_names(component),
    do: component |> Capsid.Component.exports() |> Enum.map(& &1.name) |> Enum.sort()

  test "the committed sources are what the generator produces" do
    for name <- Hostile.committed() do
      {^name, defaults} = List.keyfind(Hostile.fixtures(), name, 0)

      assert File.read!(Hostile.source_path(name)) == Hostile.wat(name, defaults),
             "#{name}.wat is stale: run `MIX_ENV=test mix run -e 'Capsid.Hostile.write_sources()'`"
    end
  end

  test "every fixture has a generator function with its defaults" do
    for {name, defaults} <- Hostile.fixtures() do
      assert function_exported?(Hostile, name, length(defaults))
      assert function_exported?(Hostile, name, 0)
    end
  end

  test "enum_bomb: one identity export per enum, case names distinct across enums" do
    c = load!(Hostile.enum_bomb(3, 4))
    assert export_names(c) == ["e0", "e1", "e2"]
    i = start!(c)
    assert {:ok, :e1_c3} = Capsid.call(i, "e1", [:e1_c3])
    assert {:ok, :e2_c0} = Capsid.call(i, "e2", [:e2_c0])
  end

  test "record_bomb: a record taken and given, flat and through memory" do
    for n <- [3, 20] do
      c = load!(Hostile.record_bomb(n))
      assert export_names(c) == ["give", "take"]
      i = start!(c)
      assert {:ok, record} = Capsid.call(i, "give", [])
      assert record == Map.new(0..(n - 1), &{String.to_atom("f#{&1}"), 0})
      assert {:ok, 7} = Capsid.call(i, "take", [record])
    end
  end

  test "variant_bomb: pick(i) is case i, take gives the discriminant" do
    c = load!(Hostile.variant_bomb(5))
    i = start!(c)
    assert {:ok, :v4} = Capsid.call(i, "pick", [4])
    assert {:ok, 3} = Capsid.call(i, "take", [:v3])
    assert {:error, %Capsid.Trap{}} = Capsid.call(i, "pick", [5])
  end

  test "long_enum_names: the long case through an export and an import" do
    c = load!(Hostile.long_enum_names(10))
    assert export_names(c) == ["call-hook", "long", "short"]
    test_pid = self()
    i = start!(c, %{"hook" => fn x -> send(test_pid, {:hook, x}) && :other end})
    assert {:ok, :short} = Capsid.call(i, "short", [])
    assert {:ok, :aaaaaaaaaa} = Capsid.call(i, "long", [])
    assert {:ok, :other} = Capsid.call(i, "call-hook", [])
    assert_received {:hook, :aaaaaaaaaa}
  end

  test "memories, tables, many_funcs, many_instances: ok() is 42" do
    for bytes <- [
          Hostile.memories(3, 1),
          Hostile.memories(3, 0),
          Hostile.tables(3, 10),
          Hostile.many_funcs(100),
          Hostile.many_instances(3)
        ] do
      c = load!(bytes)
      assert export_names(c) == ["ok"]
      assert {:ok, 42} = Capsid.call(start!(c), "ok", [])
    end
  end

  test "handle_leak: leak(n) returns n" do
    i = start!(load!(Hostile.handle_leak()))
    assert {:ok, 10} = Capsid.call(i, "leak", [10])
  end

  test "deep_type: a balanced tree of 2^depth zero bytes" do
    i = start!(load!(Hostile.deep_type(2)))
    assert {:ok, {{0, 0}, {0, 0}}} = Capsid.call(i, "deep", [])
  end

  test "long_export_name and long_import_name: the long name is the export or import" do
    long = String.duplicate("a", 50)
    c = load!(Hostile.long_export_name(50))
    assert export_names(c) == [long, "ok"]
    assert {:ok, 42} = Capsid.call(start!(c), long, [])

    c = load!(Hostile.long_import_name(50))
    assert [%{name: ^long}] = Capsid.Component.imports(c)
    assert {:ok, 42} = Capsid.call(start!(c, %{long => fn -> 1 end}), "ok", [])
  end

  test "many_exports and many_imports: the names f0.. and i0.." do
    c = load!(Hostile.many_exports(10))
    assert export_names(c) == Enum.sort(for k <- 0..9, do: "f#{k}")
    assert {:ok, 42} = Capsid.call(start!(c), "f9", [])

    c = load!(Hostile.many_imports(10))
    imports = Map.new(0..9, &{"i#{&1}", fn -> 1 end})

    assert Enum.sort(Enum.map(Capsid.Component.imports(c), & &1.name)) ==
             Enum.sort(Map.keys(imports))

    assert {:ok, 42} = Capsid.call(start!(c, imports), "ok", [])
  end

  test "many_params: wide takes n u8 arguments, flat and through memory" do
    for n <- [3, 20] do
      c = load!(Hostile.many_params(n))
      assert [%{name: "wide", params: params}] = Capsid.Component.exports(c)
      assert length(params) == n
      assert {:ok, 7} = Capsid.call(start!(c), "wide", List.duplicate(1, n))
    end
  end

  test "long_names: the long record field, flag and variant case" do
    c = load!(Hostile.long_names(10))
    assert export_names(c) == ["call-see", "flg", "ok", "rec", "var"]
    test_pid = self()
    i = start!(c, %{"see" => fn r, f, v -> send(test_pid, {:see, r, f, v}) && 1 end})
    assert {:ok, %{aaaaaaaaaa: 1, b: 2}} = Capsid.call(i, "rec", [])
    assert {:ok, [:aaaaaaaaaa]} = Capsid.call(i, "flg", [])
    assert {:ok, :aaaaaaaaaa} = Capsid.call(i, "var", [])
    assert {:ok, 1} = Capsid.call(i, "call-see", [])
    assert_received {:see, %{aaaaaaaaaa: 1, b: 2}, [:aaaaaaaaaa], :aaaaaaaaaa}
  end

  test "amplify: every entry is the same bytes" do
    i = start!(load!(Hostile.amplify(3, 4)))
    assert {:ok, ["aaaa", "aaaa", "aaaa"]} = Capsid.call(i, "amp", [])
    assert {:ok, ["aaaa", "aaaa", "aaaa"]} = Capsid.call(i, "amp-str", [])
  end

  test "start_loop: instantiation never ends by itself" do
    c = load!(Hostile.start_loop())

    assert {:error, %Capsid.Trap{}} =
             Capsid.Instance.start_link(component: c, fuel: 100_000, timeout: 1_000)
  end

  # Each is one past a cap of wasmparser (the validator wasmtime 48 uses).
  @over_the_caps [
    {:deep_type, [19], "effective type size exceeds the limit of 1000000"},
    {:many_params, [1_001], "component function parameters size is out of bounds"},
    {:long_export_name, [100_001], "string size out of bounds"},
    {:record_bomb, [10_001], "record field size is out of bounds"},
    {:variant_bomb, [10_001], "variant cases size is out of bounds"},
    {:enum_bomb, [1, 10_001], "enum cases size is out of bounds"},
    {:memories, [101, 0], "memories count exceeds limit of 100"},
    {:tables, [101, 1], "tables count exceeds limit of 100"}
  ]

  test "one past each documented cap is rejected" do
    for {name, params, message} <- @over_the_caps do
      bytes = apply(Hostile, name, params)
      assert {:error, error} = Hostile.validate(bytes)
      assert error =~ message, "#{name}#{inspect(params)}: #{error}"

      assert {:error, %Capsid.Error{kind: :invalid_component}} =
               Capsid.Component.load(bytes, cache: false)
    end
  end

  # The review-sized fixtures, validated (not compiled: some of them are
  # compile-cost bombs). About 30 s, most of it generating many_funcs.
  @tag :stress
  @tag timeout: 300_000
  test "every fixture at its default size is a valid component" do
    for {name, defaults} <- Hostile.fixtures() do
      assert :ok = Hostile.validate(apply(Hostile, name, defaults)), "#{name}#{inspect(defaults)}"
    end
  end
end
