defmodule Capsid.BindingsTest do
  use ExUnit.Case, async: true

  import Capsid.TestHelpers

  alias Capsid.Test.{CalcPy, Toolkit}

  @calc_py "test/fixtures/foreign/calc_py.wasm"

  # Every exported freestanding function of `component` with the module and
  # function name that the bindings of `root` give it.
  defp bound(component, root) do
    for f <- Capsid.Component.exports(component), not String.starts_with?(f.function, "[") do
      mod =
        case f.interface do
          nil -> root
          iface -> Module.concat(root, iface |> String.split(["/", "@"]) |> Enum.at(1) |> camel())
        end

      {f, mod, String.to_atom(String.replace(f.function, "-", "_"))}
    end
  end

  defp camel(name), do: name |> String.split("-") |> Enum.map_join(&String.capitalize/1)

  describe "the toolkit's bindings" do
    setup do
      %{pid: start_toolkit()}
    end

    test "every export is a function, its bang form too, and both call it", %{pid: pid} do
      component = toolkit()
      funs = bound(component, Toolkit)
      assert length(funs) == length(Capsid.Component.exports(component))

      for {f, mod, name} <- funs do
        n = length(f.params)
        Code.ensure_loaded!(mod)
        assert function_exported?(mod, name, n + 1), "#{inspect(mod)}.#{name}/#{n + 1}"
        assert function_exported?(mod, name, n + 2)
        assert function_exported?(mod, :"#{name}!", n + 1)

        # Any valid arguments: the generated function gives what
        # Capsid.call gives for the same ones.
        args = Enum.map(f.params, fn {_, t} -> Capsid.Fuzz.value(t).(5) end)
        expected = Capsid.call(pid, f.name, args)
        assert apply(mod, name, [pid | args]) == expected, f.name
        assert apply(mod, name, [pid | args] ++ [[timeout: 1_000]]) == expected

        case expected do
          {:ok, value} -> assert apply(mod, :"#{name}!", [pid | args]) == value
          {:error, _} -> :ok
        end
      end
    end

    test "values as Capsid maps them", %{pid: pid} do
      assert Toolkit.add(pid, 1, 2) == {:ok, 3}
      assert Toolkit.add!(pid, 1, 2) == 3
      assert %{words: 2, longest_word: "hello"} = Toolkit.Text.analyze!(pid, "hello world")

      items = [%{sku: "book", quantity: 2, unit_price_cents: 1500, tags: [:taxable]}]
      assert {:ok, {:ok, %{currency: :eur}}} = Toolkit.Pricing.quote(pid, items, :none, :eur)
      assert Toolkit.Pricing.divide!(pid, 7, 0) == {:error, "division by zero"}
    end

    test "the bang form raises the error, call options are passed on", %{pid: pid} do
      assert_raise Capsid.Error, ~r/args\[1\]: expected s32/, fn -> Toolkit.add!(pid, 1, "2") end
      assert {:error, %Capsid.Error{kind: :bad_argument}} = Toolkit.add(pid, 1, "2")

      assert {:error, %Capsid.Trap{kind: :out_of_fuel}} =
               Toolkit.Text.word_frequencies(pid, String.duplicate("a b ", 10_000), 3, fuel: 1_000)
    end
  end

  describe "specs and docs" do
    test "every function has a spec for both arities, from its WIT types" do
      for {f, mod, name} <- bound(toolkit(), Toolkit) do
        {:ok, specs} = Code.Typespec.fetch_specs(mod)
        n = length(f.params)

        for arity <- [n + 1, n + 2], fun <- [name, :"#{name}!"] do
          assert List.keymember?(specs, {fun, arity}, 0), "no spec for #{fun}/#{arity}"
        end
      end

      assert spec(Toolkit, :add, 3) ==
               "add(term(), -2_147_483_648..2_147_483_647, -2_147_483_648..2_147_483_647) ::\n" <>
                 "  {:ok, -2_147_483_648..2_147_483_647} | {:error, Capsid.Error.t() | Capsid.Trap.t()}"

      assert spec(Toolkit.Pricing, :quote!, 4) ==
               "quote!(term(), [line_item()], discount(), currency()) ::\n" <>
                 "  {:ok, basket_quote()} | {:error, String.t()}"

      assert spec(Toolkit.Text, :word_frequencies!, 3) ==
               "word_frequencies!(term(), String.t(), 0..4_294_967_295) :: [{String.t(), 0..4_294_967_295}]"
    end

    test "named WIT types are @types of their interface's module" do
      assert type(Toolkit.Pricing, :currency) == "currency() :: :eur | :usd | :gbp"
      assert type(Toolkit.Pricing, :item_tags) =~ "[:taxable | :discountable | :fragile | :digital]"

      assert type(Toolkit.Pricing, :discount) ==
               "discount() ::\n  :none\n  | {:percent, 0..255}\n  | {:fixed_cents, non_neg_integer()}\n" <>
                 "  | {:buy_x_get_y, {0..4_294_967_295, 0..4_294_967_295}}"

      assert type(Toolkit.Echo, :nested) =~ "maybe_maybe: {:some, 0..4_294_967_295 | nil} | nil"
      assert type(Toolkit.Echo, :nested) =~ "outcome: {:ok, binary()} | {:error, String.t()}"
    end

    test "docs give the WIT signature with type names" do
      assert doc(Toolkit.Pricing, :quote, 5) =~
               "quote: func(items: list<line-item>, discount: discount, currency: currency) -> " <>
                 "result<basket-quote, string>"

      assert doc(Toolkit.Pricing, :quote, 5) =~ "acme:toolkit/pricing@0.1.0#quote"
      assert doc(Toolkit.Pricing, :quote!, 5) =~ "raises"
      assert {:docs_v1, _, _, _, %{"en" => moduledoc}, _, _} = Code.fetch_docs(Toolkit.Pricing)
      assert moduledoc =~ "acme:toolkit/pricing@0.1.0"
    end
  end

  describe "a componentize-py component" do
    test "its interface becomes a module whose functions work" do
      {:ok, pid} =
        Capsid.Instance.start_link(component: Capsid.Component.load!(@calc_py), timeout: 30_000)

      assert CalcPy.Math.add(pid, 2, 3) == {:ok, 5}
      assert CalcPy.Math.stats!(pid, [1.0, 2.0, 4.5]) == %{count: 3, mean: 2.5, max: 4.5}
      assert CalcPy.Math.safe_div!(pid, 1, 0) == {:error, "division by zero"}
      assert CalcPy.Math.greet!(pid, nil) == "Hello, stranger!"
      assert spec(CalcPy.Math, :stats!, 2) =~ ":: summary()"
      assert type(CalcPy.Math, :summary) =~ "count: 0..4_294_967_295"
      # componentize-py's own unnamed "exports" instance has a module too.
      assert Code.ensure_loaded?(CalcPy.Exports)
      assert function_exported?(CalcPy.Exports, :init, 4)
    end
  end

  test "a file that is not a component is a compile error naming it" do
    assert_raise CompileError, ~r/not_a_component\.wasm/, fn ->
      Code.compile_string("""
      defmodule CapsidBindingsBad do
        use Capsid.Bindings, component: "#{__DIR__}/not_a_component.wasm"
      end
      """)
    end
  end

  describe "doc comments from a package-docs section" do
    # The toolkit with a `package-docs` custom section (version byte 1, then
    # JSON) documenting two functions of its `text` interface.
    defp documented_toolkit do
      json =
        ~s({"docs":"The toolkit.","interfaces":{"text":{"docs":"Text analysis.",) <>
          ~s("funcs":{"analyze":"Counts words.\\nAnd characters.","slugify":"Slugs."}}}})

      name = "package-docs"
      contents = <<byte_size(name)>> <> name <> <<1>> <> json
      File.read!(Capsid.Guests.path(:toolkit)) <> <<0>> <> leb(byte_size(contents)) <> contents
    end

    defp leb(n) when n < 128, do: <<n>>
    defp leb(n), do: <<1::1, Bitwise.band(n, 127)::7>> <> leb(Bitwise.bsr(n, 7))

    test "reach describe/1 and the generated @doc" do
      bytes = documented_toolkit()
      wit = Capsid.Component.describe!(bytes)
      assert wit =~ "/// Counts words.\n    /// And characters.\n    analyze: func"
      assert wit =~ "/// Text analysis.\n  interface text"

      dir = Path.join(System.tmp_dir!(), "capsid-docs-#{System.unique_integer([:positive])}")
      File.mkdir_p!(dir)
      on_exit(fn -> File.rm_rf(dir) end)
      File.write!(Path.join(dir, "documented.wasm"), bytes)

      File.write!(Path.join(dir, "documented.ex"), """
      defmodule CapsidDocumented do
        use Capsid.Bindings, component: #{inspect(Path.join(dir, "documented.wasm"))}
      end
      """)

      # `mix test` may still be loading test files (with docs off) while
      # async tests run: docs on, as in a project's own compile.
      Code.put_compiler_option(:docs, true)

      {:ok, _, _} =
        Kernel.ParallelCompiler.compile_to_path([Path.join(dir, "documented.ex")], dir,
          return_diagnostics: true
        )

      {:docs_v1, _, _, _, %{"en" => moduledoc}, _, docs} =
        Code.fetch_docs(Path.join(dir, "Elixir.CapsidDocumented.Text.beam"))

      assert moduledoc =~ "Text analysis."

      assert Enum.find_value(docs, fn
               {{:function, :analyze, 3}, _, _, %{"en" => d}, _} -> d
               _ -> nil
             end) =~ "Counts words.\nAnd characters."
    after
      purge([
        CapsidDocumented,
        CapsidDocumented.Text,
        CapsidDocumented.Pricing,
        CapsidDocumented.Echo
      ])
    end
  end

  describe "names" do
    test "clashing interface names, keywords and parameters named like ours" do
      dir = Path.join(System.tmp_dir!(), "capsid-names-#{System.unique_integer([:positive])}")
      File.mkdir_p!(dir)
      on_exit(fn -> File.rm_rf(dir) end)
      wasm = Path.join(dir, "names.wasm")
      wat = Path.expand("../fixtures/hand/names.wat", __DIR__)
      {_, 0} = System.cmd(Capsid.Hostile.wat2wasm!(), [wat, wasm], stderr_to_stdout: true)

      File.write!(Path.join(dir, "names.ex"), """
      defmodule CapsidNames do
        use Capsid.Bindings, component: #{inspect(wasm)}
      end
      """)

      {:ok, mods, _} =
        Kernel.ParallelCompiler.compile_to_path([Path.join(dir, "names.ex")], dir,
          return_diagnostics: true
        )

      assert Enum.sort(mods) ==
               [
                 CapsidNames,
                 CapsidNames.AcmeAMath,
                 CapsidNames.AcmeBMath100,
                 CapsidNames.AcmeBMath200
               ]

      # Modules compiled by this test: called through variables, so that
      # the test file compiles without them.
      [root, a, b1, b2] = mods |> Enum.sort()
      {:ok, pid} = Capsid.Instance.start_link(component: Capsid.Component.load!(wasm, cache: false))
      assert a.get(pid) == {:ok, 1}
      assert b1.get(pid) == {:ok, 2}
      assert b2.get!(pid) == 3
      assert root.end_(pid) == {:ok, 1}
      # sub(target: u32, opts: u32): our own target and opts stay first and last.
      assert root.sub(pid, 10, 4) == {:ok, 6}
      assert root.sub(pid, 10, 4, timeout: 1_000) == {:ok, 6}
    after
      purge([
        CapsidNames,
        CapsidNames.AcmeAMath,
        CapsidNames.AcmeBMath100,
        CapsidNames.AcmeBMath200
      ])
    end
  end

  # Compiles `use Capsid.Bindings` on the hand-written fixture `wat` as
  # module `root` (to disk, in a fresh directory): `{:ok, modules, wasm}` or
  # `{:error, message}` for a compile error.
  defp bind_fixture(wat, root) do
    dir = Path.join(System.tmp_dir!(), "capsid-bind-#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    on_exit(fn -> File.rm_rf(dir) end)
    wasm = Path.join(dir, "c.wasm")
    source = Path.expand("../fixtures/hand/#{wat}", __DIR__)
    {_, 0} = System.cmd(Capsid.Hostile.wat2wasm!(), [source, wasm], stderr_to_stdout: true)
    bind_file(wasm, root, dir)
  end

  defp bind_file(wasm, root, dir), do: Capsid.TestHelpers.compile_bindings(wasm, root, dir)

  describe "names that collide in Elixir" do
    test "interfaces a:x/foo and b:y/FOO are distinct modules, each calling its own" do
      {:ok, mods, wasm} = bind_fixture("case_names.wat", CapsidCaseNames)

      assert mods == [
               CapsidCaseNames,
               CapsidCaseNames.AXFoo,
               CapsidCaseNames.BYFoo,
               CapsidCaseNames.Types
             ]

      [_root, lower, upper, _types] = mods
      {:ok, pid} = Capsid.Instance.start_link(component: Capsid.Component.load!(wasm, cache: false))
      assert Capsid.call(pid, "a:x/foo#get", [5]) == {:ok, 1}
      assert lower.get(pid, 5) == {:ok, 1}
      assert upper.get(pid, 5) == {:ok, 2}
      beam = Path.join(Path.dirname(wasm), "Elixir.CapsidCaseNames.AXFoo.beam")
      assert {:docs_v1, _, _, _, %{"en" => doc}, _, _} = Code.fetch_docs(beam)
      assert doc =~ "`a:x/foo`"
    after
      purge([CapsidCaseNames, CapsidCaseNames.AXFoo, CapsidCaseNames.BYFoo, CapsidCaseNames.Types])
    end

    test "types integer and integer-type get distinct Elixir type names" do
      {:ok, _mods, wasm} = bind_fixture("case_names.wat", CapsidTypeNames)
      # The module's own .beam, where its types are.
      types = File.read!(Path.join(Path.dirname(wasm), "Elixir.CapsidTypeNames.Types.beam"))
      assert type(types, :integer_type) == "integer_type() :: :x | :y"
      assert type(types, :integer_type_2) == "integer_type_2() :: :p | :q"
      assert spec(types, :g!, 2) =~ "g!(term(), integer_type_2())"
    after
      purge([CapsidTypeNames, CapsidTypeNames.AXFoo, CapsidTypeNames.BYFoo, CapsidTypeNames.Types])
    end

    test "names no qualification tells apart are a compile error naming both interfaces" do
      # a:b-c/d and a-b:c/D: the same module whichever way it is qualified.
      assert {:error, message} = bind_fixture("clashing_names.wat", CapsidClashingNames)
      assert message =~ "a:b-c/d"
      assert message =~ "a-b:c/D"
      assert message =~ "CapsidClashingNames.ABCD"
    end
  end

  describe "hostile components" do
    test "a type of 2^18 leaves is refused with a clear error, nothing crashes" do
      assert {:error, %Capsid.Error{kind: :resource_limit, message: msg}} =
               Capsid.Component.describe(Capsid.Hostile.deep_type(18))

      assert msg =~ "too large to describe"
      # Smaller ones describe fine.
      assert {:ok, _} = Capsid.Component.describe(Capsid.Hostile.deep_type(4))
    end

    test "garbage is an invalid component, not a crash" do
      assert {:error, %Capsid.Error{kind: :invalid_component}} =
               Capsid.Component.describe(<<0, "asm", 13, 0, 1, 0, 255, 255>>)
    end
  end

  defp spec(mod, fun, arity) do
    {:ok, specs} = Code.Typespec.fetch_specs(mod)
    {_, [s | _]} = List.keyfind(specs, {fun, arity}, 0)
    fun |> Code.Typespec.spec_to_quoted(s) |> Macro.to_string()
  end

  defp type(mod, name) do
    {:ok, types} = Code.Typespec.fetch_types(mod)

    Enum.find_value(types, fn {_, {n, _, _} = t} ->
      n == name && t |> Code.Typespec.type_to_quoted() |> Macro.to_string()
    end)
  end

  defp doc(mod, fun, arity) do
    {:docs_v1, _, _, _, _, _, docs} = Code.fetch_docs(mod)

    Enum.find_value(docs, fn
      {{_, ^fun, ^arity}, _, _, %{"en" => d}, _} -> d
      _ -> nil
    end)
  end

  describe "wit: dir" do
    test "generates the same API from the WIT source as from the component" do
      from_wit = Capsid.Test.ResFromWit.Shop
      from_component = Capsid.Test.Res.Shop
      assert from_wit.__info__(:functions) == from_component.__info__(:functions)

      assert Capsid.Test.ResFromWit.Shop.Cart.__info__(:functions) ==
               Capsid.Test.Res.Shop.Cart.__info__(:functions)

      # The same specs, but for the lines they were defined at.
      specs = fn mod ->
        {:ok, specs} = Code.Typespec.fetch_specs(mod)

        for {{name, _arity}, list} <- specs, spec <- list do
          name |> Code.Typespec.spec_to_quoted(spec) |> Macro.to_string()
        end
        |> Enum.sort()
      end

      assert specs.(from_wit) == specs.(from_component)

      c = Capsid.Component.load!(Capsid.Guests.path(:res))
      {:ok, pid} = Capsid.Instance.start_link(component: c)
      cart = Capsid.Test.ResFromWit.Shop.Cart.new!(pid, "ada")
      assert Capsid.Test.ResFromWit.Shop.Cart.add(cart, "apple", 2) == {:ok, nil}
      assert from_wit.consume!(pid, cart) == 2
    end

    test "every WIT file read is an external resource" do
      attrs = Capsid.Test.ResFromWit.__info__(:attributes)
      files = for {:external_resource, [f]} <- attrs, do: f
      assert Enum.any?(files, &String.ends_with?(&1, "wit/res/res.wit"))
    end

    test "a bad directory or world is a compile error naming it" do
      for {opts, pattern} <- [
            {[wit: "wit/nothing-here"], "wit/nothing-here"},
            {[wit: "wit/res", world: "nope"], "nope"}
          ] do
        code =
          quote do
            defmodule Capsid.Test.BadWit do
              use Capsid.Bindings, unquote(opts)
            end
          end

        error = assert_raise CompileError, fn -> Code.eval_quoted(code) end
        assert Exception.message(error) =~ pattern
      end
    end
  end
end
