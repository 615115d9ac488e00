defmodule Capsid.ComponentTest do
  use ExUnit.Case, async: true

  alias Capsid.{Component, Error}
  import Capsid.TestHelpers

  doctest Capsid.Component
  doctest Capsid.Types
  doctest Capsid.Limits
  doctest Capsid.Guests

  @core_module <<0, "asm", 1, 0, 0, 0>>

  describe "load/2" do
    test "loads from a path and from the bytes, with the same hash" do
      path = Capsid.Guests.path(:toolkit)
      from_path = Component.load!(path)
      from_bytes = Component.load!(File.read!(path))
      assert from_path.hash == from_bytes.hash

      assert from_path.hash ==
               :crypto.hash(:sha256, File.read!(path)) |> Base.encode16(case: :lower)

      assert from_path.size == byte_size(File.read!(path))
    end

    test "garbage bytes are an invalid component" do
      assert {:error, %Error{kind: :invalid_component, message: msg}} =
               Component.load(<<0, 1, 2, 3, 255, 254>>)

      assert msg =~ "not a WebAssembly binary"
    end

    test "a truncated component is an invalid component" do
      bytes = File.read!(Capsid.Guests.path(:toolkit))
      truncated = binary_part(bytes, 0, div(byte_size(bytes), 2))
      assert {:error, %Error{kind: :invalid_component, message: msg}} = Component.load(truncated)
      assert msg =~ "invalid component"
    end

    test "a truncated file is an invalid component" do
      path =
        Path.join(System.tmp_dir!(), "capsid-truncated-#{System.unique_integer([:positive])}.wasm")

      File.write!(path, binary_part(File.read!(Capsid.Guests.path(:toolkit)), 0, 1000))
      on_exit(fn -> File.rm(path) end)
      assert {:error, %Error{kind: :invalid_component}} = Component.load(path)
    end

    test "a core wasm module is refused with an explanation" do
      assert {:error, %Error{kind: :invalid_component, message: msg}} = Component.load(@core_module)
      assert msg =~ "core WebAssembly module, not a component"
    end

    test "a missing file is a file error naming the path" do
      assert {:error, %Error{kind: :file_error, message: msg}} =
               Component.load("/nope/missing.wasm")

      assert msg =~ "/nope/missing.wasm"
      assert msg =~ "no such file"
    end

    test "a non-binary is refused, unknown options raise" do
      assert {:error, %Error{kind: :invalid_component}} = Component.load(123)

      assert_raise ArgumentError, ~r/unknown option :cahce.*Did you mean :cache/, fn ->
        Component.load(Capsid.Guests.path(:toolkit), cahce: true)
      end

      assert_raise ArgumentError, ~r/invalid value for :cache/, fn ->
        Component.load(Capsid.Guests.path(:toolkit), cache: :yes)
      end
    end

    test "load!/1 raises the error" do
      assert_raise Error, ~r/file_error/, fn -> Component.load!("/nope.wasm") end
    end
  end

  describe "introspection" do
    setup do
      %{component: toolkit()}
    end

    test "root and interface exports with WIT types", %{component: c} do
      exports = Map.new(Component.exports(c), &{&1.name, &1})

      assert %{interface: nil, function: "add", params: [{"a", :s32}, {"b", :s32}], result: :s32} =
               exports["add"]

      quote_fn = exports["acme:toolkit/pricing@0.1.0#quote"]
      assert quote_fn.interface == "acme:toolkit/pricing@0.1.0"
      assert quote_fn.function == "quote"

      assert [
               {"items", {:list, {:record, item_fields}}},
               {"discount", {:variant, cases}},
               {"currency", {:enum, ["eur", "usd", "gbp"]}}
             ] = quote_fn.params

      assert {"tags", {:flags, ["taxable", "discountable", "fragile", "digital"]}} in item_fields
      assert {"unit-price-cents", :u64} in item_fields
      assert {"buy-x-get-y", {:tuple, [:u32, :u32]}} in cases
      assert {"none", nil} in cases
      assert {:result, {:record, _}, :string} = quote_fn.result

      assert exports["acme:toolkit/echo@0.1.0#noop"].result == nil
      assert exports["acme:toolkit/echo@0.1.0#echo-unit-result"].result == {:result, nil, nil}

      assert exports["acme:toolkit/echo@0.1.0#echo-nested-option"].result ==
               {:option, {:option, :string}}

      assert Component.signature(exports["acme:toolkit/text@0.1.0#word-frequencies"]) ==
               "acme:toolkit/text@0.1.0#word-frequencies: func(input: string, top: u32) -> list<tuple<string, u32>>"
    end

    test "imports: root functions and WASI interfaces", %{component: c} do
      imports = Map.new(Component.imports(c), &{&1.name, &1})

      assert imports["log"].params == [
               {"level", {:enum, ["debug", "info", "warn", "error"]}},
               {"msg", :string}
             ]

      assert imports["get-config"].result == {:option, :string}
      assert Enum.any?(Map.keys(imports), &String.starts_with?(&1, "wasi:"))
    end

    test "inspect is short", %{component: c} do
      assert inspect(c) =~
               ~r/^#Capsid.Component<sha256:[0-9a-f]{12} \d+ exports, \d+ imports, \d+ bytes>$/
    end
  end
end
