defmodule Capsid.Bindings do
  @moduledoc """
  A typed Elixir API generated from a component, at compile time.

      defmodule MyPlugin do
        use Capsid.Bindings, component: "priv/guests/my_plugin.wasm"
      end

      {:ok, pid} = Capsid.Instance.start_link(component: Capsid.Component.load!("priv/guests/my_plugin.wasm"))
      {:ok, quote} = MyPlugin.Pricing.quote(pid, items, :none, :eur)
      quote = MyPlugin.Pricing.quote!(pid, items, :none, :eur, timeout: 100)

  What is generated:

    * **a module per exported interface**, named after the interface in
      CamelCase (`pricing` → `MyPlugin.Pricing`). Interfaces whose names
      give the same module (two packages' `pricing`, or `foo` and `FOO`)
      are qualified by their package (`MyPlugin.AcmePricing`), and those
      that still clash (two versions of a package) by their whole key
      (`MyPlugin.AcmePricing010`); names that no qualification tells apart
      are a compile error naming both interfaces. The component's root
      exports are functions of the `use`-ing module itself;
    * **a function per exported function**, snake_case (`word-frequencies`
      → `word_frequencies`), taking the call's target first (anything
      `Capsid.call/4` accepts: an instance, a pool, a deployment) and call
      options last (`:timeout`, `:fuel`, ... of `Capsid.call/4`, optional).
      `name/n` returns `{:ok, value} | {:error, exception}`; `name!/n`
      returns the value or raises;
    * **a `@spec` per function** from its WIT types, as Capsid maps values
      (records as maps with atom keys, variants as tagged tuples, enums as
      atoms, `option<T>` as `T | nil`, ...), and a `@type` per named WIT
      type of the interface (`record text-stats` → `text_stats/0`);
    * **a `@doc` per function** with its WIT signature (named types) and
      the WIT doc comment when the component carries one;
    * **a module per resource** inside its interface's module
      (`MyPlugin.Shop.Cart`): `new` for the constructor, methods taking
      the `Capsid.Resource` handle first (the call goes to the handle's
      instance), statics taking the target first; handles are typed
      `Capsid.Resource.t()`.

  The component file is an `@external_resource`: changing it recompiles
  the module. `:component` is a path (relative to the project's root) or an
  expression evaluated at compile time that gives one, such as
  `Capsid.Guests.path(:toolkit)` for a dependency's guest.

  Instead of a component, the bindings can come from its WIT source:
  `use Capsid.Bindings, wit: "wit/my_plugin", world: "plugin"` reads the
  WIT package in that directory (and its `deps/`) with wit-parser, the
  parser of the component tools themselves, and generates the same modules
  from the world's exports (`:world` may be left out when the package has
  one world). Every WIT file read is an `@external_resource`.

  A function whose snake_case name is an Elixir keyword (`end`, `do`, ...)
  gets a trailing underscore (`end_`), as do parameters named `target` or
  `opts`. A type whose Elixir name another type of the same module already
  has (`integer` is `integer_type()`, a built-in's name, as is
  `integer-type`) gets `_2`, `_3`, ... in WIT order; two functions of one
  module with the same Elixir name and arity are a compile error naming
  both.

  Every name becomes an atom, and atoms are never collected: the bindings
  of one component may create at most as many new atoms as loading a
  component may (`config :capsid, :max_atoms_per_component`, 10,000 by
  default), and count against the same node-wide limit
  (`:max_atoms_total`, 100,000, with the atoms loads have created); past
  either, `use` is a compile error naming the setting, and generation
  stops before creating more.
  """

  alias Capsid.Bindings.Generate

  @doc false
  defmacro __using__(opts) do
    {path, api} =
      case {Keyword.fetch(opts, :component), Keyword.fetch(opts, :wit)} do
        {{:ok, expr}, :error} ->
          path = path!(expr, :component, __CALLER__)
          {path, Capsid.Component.api(path)}

        {:error, {:ok, expr}} ->
          path = path!(expr, :wit, __CALLER__)
          world = Keyword.get(opts, :world)

          unless is_nil(world) or is_binary(world) do
            raise ArgumentError,
                  "use Capsid.Bindings: expected world: to be a string, got #{inspect(world)}"
          end

          api =
            case Capsid.Native.wit_dir(path, world) do
              {:ok, api} -> {:ok, api}
              {:error, {kind, message}} -> {:error, Capsid.Error.new(kind, message)}
            end

          {path, api}

        _ ->
          raise ArgumentError,
                "use Capsid.Bindings needs component: path (a .wasm component file) " <>
                  "or wit: dir (a WIT package), one of them"
      end

    generated =
      case api do
        {:ok, api} -> Generate.module(__CALLER__.module, path, api)
        {:error, e} -> {:error, Exception.message(e)}
      end

    case generated do
      {:ok, ast} ->
        ast

      {:error, message} ->
        raise CompileError,
          file: __CALLER__.file,
          line: __CALLER__.line,
          description: "Capsid.Bindings: #{path}: #{message}"
    end
  end

  defp path!(expr, key, caller) do
    case Code.eval_quoted(expr, [], caller) do
      {path, _} when is_binary(path) ->
        Path.expand(path)

      {other, _} ->
        raise ArgumentError,
              "use Capsid.Bindings: expected #{key}: to give a path, got #{inspect(other)}"
    end
  end
end

defmodule Capsid.Bindings.Generate do
  @moduledoc false
  # The code of `use Capsid.Bindings`: quoted modules, types and functions
  # from the component's decoded WIT (`Capsid.Component.api/1`).

  alias Capsid.Bindings.Spec

  @reserved ~w(do end fn nil true false when and or not in catch rescue after else
               __MODULE__ __CALLER__ __ENV__ __DIR__ __STACKTRACE__ module_info)

  @budget {__MODULE__, :atoms}

  # `{:ok, quoted}` or `{:error, message}`: a name clash, or more new
  # atoms than the budget allows.
  def module(root, path, api) do
    env = Application.get_all_env(:capsid)
    per_component = env[:max_atoms_per_component] || 10_000
    total = env[:max_atoms_total] || 100_000
    headroom = :erlang.system_info(:atom_limit) - :erlang.system_info(:atom_count)
    # The lowest of the three limits, and the message that names it.
    limit =
      Enum.min_by(
        [
          {per_component,
           "the limit is #{per_component} per component (config :capsid, :max_atoms_per_component)"},
          {max(total - Capsid.Native.node_info().atoms_created, 0),
           "components have created #{Capsid.Native.node_info().atoms_created} and the limit is " <>
             "#{total} for all of them (config :capsid, :max_atoms_total)"},
          {div(headroom, 2), "the VM's atom table is #{headroom} atoms from full"}
        ],
        &elem(&1, 0)
      )

    Process.put(@budget, {0, limit})

    try do
      {:ok, generate(root, path, api)}
    catch
      {@budget, message} -> {:error, message}
    after
      Process.delete(@budget)
    end
  end

  @doc false
  # Every atom the bindings make goes through here: names from the
  # component become atoms, which are never collected, so new ones are
  # counted (in the process generating, for the `use` being expanded) and
  # refused past the budget, before they are created.
  def atom!(name) when is_binary(name) do
    :erlang.binary_to_existing_atom(name, :utf8)
  rescue
    ArgumentError ->
      case Process.get(@budget) do
        {n, {max, why}} when n >= max ->
          throw(
            {@budget,
             "the bindings would create more than #{max} new atoms (names of modules, " <>
               "functions, parameters, types, fields and cases); #{why}"}
          )

        {n, limit} ->
          Process.put(@budget, {n + 1, limit})

        # Outside `module/3` (Spec's helpers in tests): nothing to count.
        nil ->
          :ok
      end

      String.to_atom(name)
  end

  defp clash!(message), do: throw({@budget, message})

  defp generate(root, path, api) do
    exported = Enum.filter(api.exports, &match?({:interface, _}, &1))
    modules = interface_modules(root, exported)
    # Named types, and the module that defines each one as a `@type`.
    homes = type_homes(api.types, modules, root)

    {interfaces, nested} =
      Enum.map_reduce(exported, [], fn {:interface, iface}, nested ->
        mod = Map.fetch!(modules, iface.id)
        funs = for f <- iface.function, f.kind == :freestanding, do: {f, "#{iface.key}##{f.name}"}
        own = for {:ref, id} <- iface.types, do: id

        body = module_body(mod, funs, own, homes, api.types)
        doc = module_doc(iface.docs, "the `#{iface.key}` interface", path)
        {resources, res_mods} = resource_modules(mod, iface, homes, api.types, path)

        quoted =
          quote do
            defmodule unquote(mod) do
              @moduledoc unquote(doc)
              unquote(body)
              unquote_splicing(resources)
            end
          end

        {quoted, res_mods ++ nested}
      end)

    unique_modules!(nested)

    root_funs = for {:function, f} <- api.exports, f.kind == :freestanding, do: {f, f.name}
    root_types = for {:types, {:ref, id}} <- api.exports, do: id
    root_body = module_body(root, root_funs, root_types, homes, api.types)

    listing =
      Enum.map_join(exported, "\n", fn {:interface, i} ->
        "  * `#{inspect(Map.fetch!(modules, i.id))}`: `#{i.key}`"
      end)

    root_doc =
      module_doc(api.docs, "a component", path) <>
        if(listing == "", do: "", else: "\n\nExported interfaces:\n\n" <> listing <> "\n")

    # A component file, or every file of a WIT package.
    externals =
      for file <- if(Map.get(api, :files, []) == [], do: [path], else: api.files) do
        quote(do: @external_resource(unquote(file)))
      end

    quote do
      unquote_splicing(externals)
      @moduledoc unquote(root_doc)
      unquote(root_body)
      unquote_splicing(interfaces)
    end
  end

  # A module per resource of the interface (`Shop.Carts.Cart`): `new` for
  # its constructor, its methods taking the handle first (its instance is
  # where they run), its statics taking the target first. Also gives each
  # module with what it is for, to check that no two are the same.
  defp resource_modules(mod, iface, homes, types, path) do
    iface.function
    |> Enum.reject(&(&1.kind == :freestanding))
    |> Enum.group_by(fn %{kind: {_, {:ref, rid}}} -> rid end)
    |> Enum.map(fn {rid, funs} ->
      res = Map.fetch!(types, rid)
      res_mod = concat(mod, camel(res.name))

      funs =
        for f <- funs do
          {kind, _} = f.kind

          elixir_name =
            case kind do
              :constructor -> "new"
              _ -> f.name |> String.split(".", parts: 2) |> List.last()
            end

          f = Map.merge(f, %{elixir_name: elixir_name, style: kind})
          {f, "#{iface.key}##{f.name}"}
        end

      doc = module_doc(res.docs, "the resource `#{res.name}` of `#{iface.key}`", path)
      body = module_body(res_mod, funs, [], homes, types)

      quoted =
        quote do
          defmodule unquote(res_mod) do
            @moduledoc unquote(doc)
            unquote(body)
          end
        end

      {quoted, {res_mod, "the resource `#{res.name}` of `#{iface.key}`"}}
    end)
    |> Enum.unzip()
  end

  # Two generated modules with one name would be one module, the second
  # silently replacing the first.
  defp unique_modules!(named) do
    named
    |> Enum.group_by(&elem(&1, 0), &elem(&1, 1))
    |> Enum.find(fn {_, whats} -> length(whats) > 1 end)
    |> case do
      nil ->
        :ok

      {mod, whats} ->
        clash!(
          "#{Enum.join(Enum.sort(whats), " and ")} would both be the module #{inspect(mod)} " <>
            "(no qualification tells them apart); expected names that give distinct Elixir modules"
        )
    end
  end

  # `Module.concat/2`, counting the atom.
  defp concat(parent, name), do: atom!("#{parent}.#{name}")

  defp module_doc(docs, what, path) do
    intro = "Generated by `Capsid.Bindings` from #{what} in `#{Path.relative_to_cwd(path)}`."
    if docs, do: docs <> "\n\n" <> intro, else: intro
  end

  # Interface id => module: its name in CamelCase; where two interfaces
  # give the same module (`foo` and `FOO`, two packages' `math`), each is
  # qualified by its package, then by its whole key (two versions). The
  # names are compared as modules, after CamelCase: `foo` and `FOO` are
  # both `Foo`. A module two interfaces still share is an error.
  defp interface_modules(root, exported) do
    ifaces = for {:interface, i} <- exported, do: i

    candidates = fn i ->
      [
        camel(base_name(i)),
        camel(package_of(i.key) <> "-" <> base_name(i)),
        camel(String.replace(i.key, ~r/[^A-Za-z0-9]+/, "-"))
      ]
    end

    counts =
      ifaces
      |> Enum.flat_map(&Enum.with_index(candidates.(&1)))
      |> Enum.frequencies()

    named =
      Enum.map(ifaces, fn i ->
        all = candidates.(i)

        name = Enum.find(Enum.with_index(all), {List.last(all), 2}, &(counts[&1] == 1)) |> elem(0)

        {i, concat(root, name)}
      end)

    unique_modules!(for {i, mod} <- named, do: {mod, "interface `#{i.key}`"})

    Map.new(named, fn {i, mod} -> {i.id, mod} end)
  end

  defp base_name(%{name: name}) when is_binary(name), do: name
  defp base_name(%{key: key}), do: key |> String.split("/") |> List.last() |> strip_version()

  defp package_of(key), do: key |> String.split("/") |> hd() |> String.replace(":", "-")
  defp strip_version(name), do: name |> String.split("@") |> hd()

  defp camel(kebab) do
    kebab
    |> String.split(["-", ".", ":", "_"], trim: true)
    |> Enum.map_join(&String.capitalize/1)
  end

  @doc false
  def snake(kebab) do
    name = String.replace(kebab, "-", "_")
    if name in @reserved, do: name <> "_", else: name
  end

  # Type id => {module, type name}: a named type is defined in the module of
  # the exported interface (or root world) that owns it; any other named
  # type it refers to (say, of an imported interface) is defined beside
  # its first user.
  defp type_homes(types, modules, root) do
    owned =
      for {id, t} <- types, reduce: %{} do
        acc ->
          case t.owner do
            owner when is_integer(owner) and is_map_key(modules, owner) ->
              Map.put(acc, id, Map.fetch!(modules, owner))

            :world ->
              Map.put(acc, id, root)

            _ ->
              acc
          end
      end

    # In WIT order, so that the same component always gives the same names.
    {homes, _taken} =
      owned
      |> Enum.sort()
      |> Enum.map_reduce(MapSet.new(), fn {id, mod}, taken ->
        base = Spec.type_name(types[id].name)
        name = Spec.first_free(base, &MapSet.member?(taken, {mod, &1}))
        {{id, {mod, name}}, MapSet.put(taken, {mod, name})}
      end)

    Map.new(homes)
  end

  # `@type`s and functions of one module.
  defp module_body(mod, funs, own_types, homes, types) do
    # Types this module defines: its own, then every named type they and
    # its functions refer to that no module owns.
    specs = Spec.new(mod, homes, types)
    {spec_funs, specs} = Enum.map_reduce(funs, specs, &function_specs/2)
    {own_defs, specs} = Enum.map_reduce(own_types, specs, &Spec.type_def(&2, &1))
    {extra_defs, _specs} = Spec.pending_defs(specs)

    type_defs =
      for {name, docs, ast} <- own_defs ++ extra_defs do
        typedoc = if docs, do: quote(do: @typedoc(unquote(docs)))

        quote do
          unquote(typedoc)
          @type unquote({name, [], []}) :: unquote(ast)
        end
      end

    fun_defs =
      for {f, name, {arg_specs, result_spec}} <- spec_funs,
          do: function(f, name, arg_specs, result_spec)

    unique_functions!(mod, fun_defs)

    # The functions as data, defined by one loop in the module's body: the
    # body is compiled as one Erlang function, whose compile time grows
    # with the square of its size, so it must not grow with the exports.
    loop =
      quote bind_quoted: [funs: Macro.escape(Enum.map(fun_defs, &elem(&1, 1)))] do
        for {name, bang, doc, bang_doc, head, head_t, target, call, params, value} <- funs do
          @doc doc
          @spec unquote(name)(unquote_splicing(head_t)) ::
                  {:ok, unquote(value)} | {:error, Capsid.Error.t() | Capsid.Trap.t()}
          @spec unquote(name)(unquote_splicing(head_t), keyword()) ::
                  {:ok, unquote(value)} | {:error, Capsid.Error.t() | Capsid.Trap.t()}
          def unquote(name)(unquote_splicing(head), opts \\ []) do
            Capsid.call(unquote(target), unquote(call), unquote(params), opts)
          end

          @doc bang_doc
          @spec unquote(bang)(unquote_splicing(head_t)) :: unquote(value)
          @spec unquote(bang)(unquote_splicing(head_t), keyword()) :: unquote(value)
          def unquote(bang)(unquote_splicing(head), opts \\ []) do
            Capsid.call!(unquote(target), unquote(call), unquote(params), opts)
          end
        end
      end

    {:__block__, [], type_defs ++ [loop]}
  end

  # Two functions with one Elixir name and overlapping arities (each is
  # defined with and without its options) cannot both be defined.
  defp unique_functions!(mod, fun_defs) do
    fun_defs
    |> Enum.flat_map(fn {wit, {name, _, _, _, head, _, _, _, _, _}} ->
      n = length(head)
      [{{name, n}, wit}, {{name, n + 1}, wit}]
    end)
    |> Enum.group_by(&elem(&1, 0), &elem(&1, 1))
    |> Enum.find(fn {_, wits} -> length(Enum.uniq(wits)) > 1 end)
    |> case do
      nil ->
        :ok

      {{name, arity}, wits} ->
        clash!(
          "the functions #{wits |> Enum.uniq() |> Enum.map_join(" and ", &"`#{&1}`")} would " <>
            "both be #{inspect(mod)}.#{name}/#{arity}; expected names that give distinct " <>
            "Elixir functions"
        )
    end
  end

  defp function_specs({f, call_name}, specs) do
    {args, specs} = Enum.map_reduce(f.params, specs, fn {_, t}, acc -> Spec.ast(acc, t) end)

    {result, specs} =
      case f.result do
        nil -> {nil, specs}
        t -> Spec.ast(specs, t)
      end

    {{f, call_name, {args, result}}, specs}
  end

  # `{wit name, fields of the module's loop}`.
  defp function(f, call_name, arg_specs, result_spec) do
    name_s = snake(Map.get(f, :elixir_name, f.name))
    name = atom!(name_s)
    bang = atom!(name_s <> "!")
    params = Enum.map(f.params, fn {p, _} -> Macro.var(param(p), nil) end)
    value = result_spec || nil

    # A method's first parameter is the handle, which knows its instance;
    # everything else takes the call's target first.
    {head, head_t, target, on} =
      case Map.get(f, :style) do
        :method ->
          [handle | _] = params
          {params, arg_specs, quote(do: unquote(handle).instance), "the handle's instance"}

        _ ->
          target = Macro.var(:target, nil)

          {[target | params], [quote(do: term()) | arg_specs], target,
           "`target` (an instance, pool or deployment, see `Capsid.call/4`)"}
      end

    doc = """
    `#{f.name}: #{f.signature}`

    #{if f.docs, do: f.docs <> "\n\n", else: ""}Calls `#{call_name}` on #{on}; `opts` are its call options. The `!` form
    returns the value or raises.
    """

    bang_doc = "Like `#{name_s}/#{length(head) + 1}`, but returns the value or raises."
    {call_name, {name, bang, doc, bang_doc, head, head_t, target, call_name, params, value}}
  end

  defp param(name) do
    case snake(name) do
      n when n in ["target", "opts"] -> atom!(n <> "_")
      n -> atom!(n)
    end
  end
end

defmodule Capsid.Bindings.Spec do
  @moduledoc false
  # WIT types as typespec AST, as Capsid maps values (DESIGN.md §2).
  # Named types become type calls: local (`text_stats()`), remote
  # (`Shop.Carts.cart()`), or, for a named type no generated module owns, a
  # `@type` added to the current module (`pending_defs/1`).

  # Past these many cases or fields a type is written as `atom()` / `map()`:
  # a component's names must not become an unbounded number of atoms.
  @max_names 256

  defstruct [:mod, :homes, :types, local: %{}, pending: []]

  def new(mod, homes, types), do: %__MODULE__{mod: mod, homes: homes, types: types}

  # `{name, docs, ast}` of a type the module owns.
  def type_def(specs, id) do
    t = Map.fetch!(specs.types, id)
    {_mod, name} = Map.fetch!(specs.homes, id)
    {ast, specs} = ast(specs, t.def)
    {{name, t.docs, ast}, specs}
  end

  # Definitions of named types referred to that no module owns; each may
  # refer to more of them.
  def pending_defs(specs, acc \\ [])
  def pending_defs(%{pending: []} = specs, acc), do: {Enum.reverse(acc), specs}

  def pending_defs(%{pending: [{id, name} | rest]} = specs, acc) do
    t = Map.fetch!(specs.types, id)
    {ast, specs} = ast(%{specs | pending: rest}, t.def)
    pending_defs(specs, [{name, t.docs, ast} | acc])
  end

  def ast(specs, {:ref, id}) do
    case specs.homes do
      %{^id => {mod, name}} when mod == specs.mod ->
        {{name, [], []}, specs}

      %{^id => {mod, name}} ->
        {quote(do: unquote(mod).unquote(name)()), specs}

      _ ->
        case specs.local do
          %{^id => name} ->
            {{name, [], []}, specs}

          _ ->
            name = free_name(specs, Map.fetch!(specs.types, id).name)

            specs = %{
              specs
              | local: Map.put(specs.local, id, name),
                pending: specs.pending ++ [{id, name}]
            }

            {{name, [], []}, specs}
        end
    end
  end

  def ast(specs, type), do: walk(specs, type)

  defp walk(specs, :bool), do: {quote(do: boolean()), specs}
  defp walk(specs, :u8), do: {quote(do: 0..255), specs}
  defp walk(specs, :s8), do: {quote(do: -128..127), specs}
  defp walk(specs, :u16), do: {quote(do: 0..65_535), specs}
  defp walk(specs, :s16), do: {quote(do: -32_768..32_767), specs}
  defp walk(specs, :u32), do: {quote(do: 0..4_294_967_295), specs}
  defp walk(specs, :s32), do: {quote(do: -2_147_483_648..2_147_483_647), specs}
  defp walk(specs, :u64), do: {quote(do: non_neg_integer()), specs}
  defp walk(specs, :s64), do: {quote(do: integer()), specs}

  defp walk(specs, f) when f in [:f32, :f64],
    do: {quote(do: float() | :nan | :infinity | :neg_infinity), specs}

  defp walk(specs, :char), do: {quote(do: char()), specs}
  defp walk(specs, :string), do: {quote(do: String.t()), specs}
  defp walk(specs, {:list, :u8}), do: {quote(do: binary()), specs}
  defp walk(specs, {:ref, _} = ref), do: ast(specs, ref)

  defp walk(specs, {:list, t}) do
    {t, specs} = walk(specs, t)
    {quote(do: [unquote(t)]), specs}
  end

  defp walk(specs, {:tuple, ts}) do
    {ts, specs} = Enum.map_reduce(ts, specs, &walk(&2, &1))
    {{:{}, [], ts}, specs}
  end

  defp walk(specs, {:option, {:option, _} = inner}) do
    {t, specs} = walk(specs, inner)
    {quote(do: {:some, unquote(t)} | nil), specs}
  end

  defp walk(specs, {:option, t}) do
    {t, specs} = walk(specs, t)
    {quote(do: unquote(t) | nil), specs}
  end

  defp walk(specs, {:result, ok, err}) do
    {ok, specs} = tagged(specs, :ok, ok)
    {err, specs} = tagged(specs, :error, err)
    {quote(do: unquote(ok) | unquote(err)), specs}
  end

  defp walk(specs, {:record, fields}) when length(fields) > @max_names,
    do: {quote(do: map()), specs}

  defp walk(specs, {:record, fields}) do
    {kvs, specs} =
      Enum.map_reduce(fields, specs, fn {name, t}, acc ->
        {t, acc} = walk(acc, t)
        {{atom(name), t}, acc}
      end)

    {{:%{}, [], kvs}, specs}
  end

  defp walk(specs, {:variant, cases}) when length(cases) > @max_names,
    do: {quote(do: atom() | {atom(), term()}), specs}

  defp walk(specs, {:variant, cases}) do
    {alts, specs} =
      Enum.map_reduce(cases, specs, fn {name, t}, acc -> tagged(acc, atom(name), t) end)

    {union(alts), specs}
  end

  defp walk(specs, {:enum, names}) when length(names) > @max_names,
    do: {quote(do: atom()), specs}

  defp walk(specs, {:enum, names}), do: {union(Enum.map(names, &atom/1)), specs}

  defp walk(specs, {:flags, names}) when length(names) > @max_names,
    do: {quote(do: [atom()]), specs}

  defp walk(specs, {:flags, []}), do: {quote(do: []), specs}

  defp walk(specs, {:flags, names}),
    do: {quote(do: [unquote(union(Enum.map(names, &atom/1)))]), specs}

  defp walk(specs, {:resource}), do: {quote(do: Capsid.Resource.t()), specs}

  defp walk(specs, {handle, ref}) when handle in [:own, :borrow] do
    if host_resource?(specs, ref),
      do: {quote(do: term()), specs},
      else: {quote(do: Capsid.Resource.t()), specs}
  end

  defp walk(specs, _unsupported), do: {quote(do: term()), specs}

  # A resource the component imports (its definition, past `use` aliases,
  # belongs to no exported interface): implemented in Elixir, any term.
  defp host_resource?(specs, {:ref, id}) do
    case specs.types[id] do
      %{def: {:ref, _} = next} -> host_resource?(specs, next)
      %{def: {:resource}} -> not Map.has_key?(specs.homes, id)
      _ -> false
    end
  end

  defp host_resource?(_specs, _inline), do: false

  defp tagged(specs, tag, nil), do: {tag, specs}

  defp tagged(specs, tag, t) do
    {t, specs} = walk(specs, t)
    {{tag, t}, specs}
  end

  defp atom(name), do: Capsid.Bindings.Generate.atom!(String.replace(name, "-", "_"))

  defp union([]), do: quote(do: none())
  defp union([one]), do: one
  defp union([a | rest]), do: {:|, [], [a, union(rest)]}

  defp free_name(specs, wit_name) do
    taken =
      MapSet.new(
        Map.values(specs.local) ++
          for({_, {mod, n}} <- specs.homes, mod == specs.mod, do: n)
      )

    first_free(type_name(wit_name), &MapSet.member?(taken, &1))
  end

  @doc false
  # `base`, or the first of `base_2`, `base_3`, ... that is not `taken?`.
  def first_free(base, taken?) do
    Stream.iterate(1, &(&1 + 1))
    |> Stream.map(fn
      1 -> base
      n -> Capsid.Bindings.Generate.atom!("#{base}_#{n}")
    end)
    |> Enum.find(&(not taken?.(&1)))
  end

  @builtin ~w(any none atom map pid port reference struct tuple float integer neg_integer
              non_neg_integer pos_integer list nonempty_list maybe_improper_list
              nonempty_improper_list nonempty_maybe_improper_list term arity as_boolean
              binary bitstring boolean byte char charlist nonempty_charlist fun function
              identifier iodata iolist keyword module mfa no_return node number timeout
              string nonempty_string nil dynamic)a

  @doc false
  # A WIT type name as an Elixir type name; built-in names get `_type`.
  def type_name(wit_name) do
    name = Capsid.Bindings.Generate.atom!(String.replace(wit_name, "-", "_"))

    if name in @builtin,
      do: Capsid.Bindings.Generate.atom!("#{name}_type"),
      else: name
  end
end
