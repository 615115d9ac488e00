defmodule Capsid.Component do
  @moduledoc """
  A compiled WebAssembly component: immutable, cheap to share between
  processes and instances.

  Compilation runs on a dirty CPU scheduler (in a thread with a large native
  stack), never on a normal scheduler.

      iex> {:ok, component} = Capsid.Component.load(Capsid.Guests.path(:toolkit))
      iex> Enum.find(Capsid.Component.exports(component), &(&1.name == "add")).result
      :s32
  """

  alias Capsid.{Error, Native, Types}

  @enforce_keys [:ref, :hash, :exports, :imports, :size]
  # `bytes` is the component's own binary (shared, not copied): `describe/1`
  # decodes its WIT on request.
  # `import_keys` is the imports' name table (`Capsid.Imports.keys/1`),
  # computed once here rather than at every instance start.
  defstruct [
    :ref,
    :hash,
    :exports,
    :imports,
    :size,
    bytes: nil,
    cache: :disabled,
    import_keys: nil,
    guard_pages: false,
    fuel_metering: true
  ]

  @typedoc """
  One function: `name` is what `Capsid.call/4` accepts (`"add"` or
  `"acme:toolkit/pricing@0.1.0#quote"`), `interface` the exported/imported
  interface (or `nil` at the root), `function` the function's own name.
  """
  @type function_info :: %{
          name: String.t(),
          interface: String.t() | nil,
          function: String.t(),
          params: [{String.t(), Types.t()}],
          result: Types.t() | nil
        }

  @typedoc """
  How the compiled code was obtained: `:hit` (loaded from the cache, no
  compilation), `:miss` (compiled and cached), `:rejected` (a cached artifact
  failed its integrity check; it was discarded, recompiled and re-cached), or
  `:disabled`.
  """
  @type cache_outcome :: :hit | :miss | :rejected | :disabled

  @type t :: %__MODULE__{
          ref: reference(),
          hash: String.t(),
          exports: [function_info()],
          imports: [function_info()],
          size: non_neg_integer(),
          bytes: binary() | nil,
          cache: cache_outcome(),
          import_keys: map() | nil,
          guard_pages: boolean(),
          fuel_metering: boolean()
        }

  # How long a load waits for a compile slot (`:max_concurrent_compiles`).
  @compile_wait 60_000
  @max_component_bytes 256 * 1024 * 1024

  @doc """
  Loads and compiles a component from a file path or from the wasm bytes
  themselves (a binary starting with `"\\0asm"`). A binary that is neither
  wasm bytes nor the name of an existing file is `:invalid_component` (its
  first bytes are shown); a missing or unreadable file is `:file_error`.

  Returns `{:error, %Capsid.Error{kind: :invalid_component}}` for core wasm
  modules, garbage and truncated input, and `kind: :file_error` when the
  file cannot be read.

  ## Options

    * `:cache` — where compiled code is cached on disk: `true` (the default:
      the `:cache_dir` application env, else the user cache directory,
      `~/.cache/capsid` on Linux), a directory, or `false`. See
      `Capsid.Cache`: artifacts are authenticated before they are loaded, a
      directory that cannot be used safely means no cache (and one warning),
      never a failed load. `component.cache` says what happened.
    * `:guard_pages` — `false` (the default) or `true`. By default every
      memory access of the guest is bounds-checked by the compiled code,
      so that linear memories need no address-space reservation: 100,000
      instances fit on a node. With `true` the component is compiled for
      an engine that reserves 4 GiB plus a 32 MiB guard region per linear
      memory and checks nothing: compute-heavy guests run faster (SHA-256
      of 1 MiB: about 1.75× native time instead of 2.1×, see
      BENCHMARKS.md), but each memory costs two kernel mappings and 4 GiB
      of address space, counted against `:address_space_limit` (16 TiB by
      default: about 4,000 such instances). Running out is
      `:resource_limit`. `component.guard_pages` says which it is.
    * `:fuel_metering` — `true` (the default) or `false`. Fuel metering
      counts the guest's instructions: it is what the `:fuel` limit
      measures, and it makes a guest yield to the scheduler at least every
      few million instructions even when Capsid's ticker thread is starved
      of CPU. It costs compute-heavy guests about a fifth of their speed
      (SHA-256 of 1 MiB with guard pages: about 1.5× native time without it,
      1.75× with it). With `false`, calls are bounded by time alone: an
      instance of such a component refuses a `:fuel` limit and
      `timeout: :infinity` (`ArgumentError`), `Capsid.call/4` with `fuel:`
      is `:bad_argument`, and `fuel_used` is 0. Time slicing and timeouts
      hold as for any component. Meant for your own compute kernels, not
      for code you do not trust to be bounded by a deadline alone.

  Compilation is bounded: components over `:max_component_bytes`
  (application env, default 256 MiB) are refused with `:resource_limit`,
  and at most `:max_concurrent_compiles` (default 2) run at once; further
  loads wait for a slot (up to a minute).

      iex> {:ok, %Capsid.Component{}} = Capsid.Component.load(Capsid.Guests.path(:toolkit))
      iex> {:error, %Capsid.Error{kind: :file_error}} = Capsid.Component.load("/no/such.wasm")
      iex> {:error, %Capsid.Error{kind: :invalid_component}} = Capsid.Component.load(<<0, "asm", 1, 0, 0, 0>>)
  """
  @spec load(Path.t() | binary(), keyword()) :: {:ok, t()} | {:error, Error.t()}
  def load(path_or_bytes, opts \\ [])

  def load(path_or_bytes, opts) when is_binary(path_or_bytes) and is_list(opts) do
    Capsid.Options.validate!(
      opts,
      [:cache, :guard_pages, :fuel_metering],
      "Capsid.Component.load/2"
    )

    cache = Capsid.Cache.settings(Keyword.get(opts, :cache, true))
    flavor = flavor!(opts)

    with {:ok, bytes} <- read(path_or_bytes) do
      t0 = System.monotonic_time()
      give_up_at = System.monotonic_time(:millisecond) + @compile_wait

      case compile(bytes, cache, flavor, give_up_at) do
        {:ok, {ref, hash, exports, imports, cache_outcome, warning}} ->
          if warning, do: Capsid.Cache.warn_unusable(warning)

          Capsid.Telemetry.execute(
            [:capsid, :component, :load],
            %{duration: System.monotonic_time() - t0, size: byte_size(bytes)},
            %{hash: hash, cache: cache_outcome}
          )

          imports = Enum.map(imports, &function_info/1)

          {:ok,
           %__MODULE__{
             ref: ref,
             hash: hash,
             exports: Enum.map(exports, &function_info/1),
             imports: imports,
             import_keys: Capsid.Imports.keys(imports),
             size: byte_size(bytes),
             bytes: bytes,
             cache: cache_outcome,
             guard_pages: elem(flavor, 0),
             fuel_metering: elem(flavor, 1)
           }}

        {:error, {kind, message}} ->
          {:error, Error.new(kind, message)}
      end
    end
  end

  def load(other, _opts) do
    {:error,
     Error.new(
       :invalid_component,
       "expected a file path or the component's bytes (a binary), got: #{inspect(other)}"
     )}
  end

  @doc "Like `load/2`, but raises `Capsid.Error`."
  @spec load!(Path.t() | binary(), keyword()) :: t()
  def load!(path_or_bytes, opts \\ []) do
    case load(path_or_bytes, opts) do
      {:ok, component} -> component
      {:error, error} -> raise error
    end
  end

  @doc false
  # `{guard_pages, fuel_metering}` from load options, checked (also by
  # deploys before they reach other nodes).
  def flavor!(opts) do
    {boolean!(opts, :guard_pages, false), boolean!(opts, :fuel_metering, true)}
  end

  defp boolean!(opts, key, default) do
    case Keyword.get(opts, key, default) do
      flag when is_boolean(flag) ->
        flag

      other ->
        raise ArgumentError,
              "invalid value for #{inspect(key)}: expected true or false, got #{inspect(other)}"
    end
  end

  defp compile(bytes, cache, flavor, give_up_at) do
    env = Application.get_all_env(:capsid)
    limits = {env[:max_component_bytes] || @max_component_bytes, env[:max_concurrent_compiles] || 2}

    budget =
      {env[:max_atoms_per_component] || 10_000, env[:max_atoms_total] || 100_000,
       :erlang.system_info(:atom_limit) - :erlang.system_info(:atom_count),
       env[:max_type_nodes] || 200_000}

    tag = make_ref()

    case Native.component_compile(bytes, cache, flavor, limits, budget, tag) do
      # Compiling on a thread of the NIF's own (never on a scheduler): it
      # always answers.
      :compiling ->
        receive do
          {:capsid_compiled, ^tag, answer} -> answer
        end

      :saturated ->
        if System.monotonic_time(:millisecond) < give_up_at do
          Process.sleep(20)
          compile(bytes, cache, flavor, give_up_at)
        else
          {:error,
           {:resource_limit,
            "#{elem(limits, 1)} compilations were already running for #{@compile_wait} ms " <>
              "(config :capsid, :max_concurrent_compiles)"}}
        end

      other ->
        other
    end
  end

  @doc """
  The component's exported functions with their WIT types.

  With `named: true`, each function also has `:signature`, its WIT
  signature with the component's type names (`func(input: string) ->
  text-stats` where `params`/`result` spell the record out), and `:docs`,
  its WIT doc comment or `nil`: the component's WIT is decoded for this
  (about a millisecond for a small component), so it is not done by default.

      iex> component = Capsid.Component.load!(Capsid.Guests.path(:toolkit))
      iex> add = Enum.find(Capsid.Component.exports(component), &(&1.name == "add"))
      iex> add.params
      [{"a", :s32}, {"b", :s32}]
      iex> analyze = Enum.find(Capsid.Component.exports(component, named: true), &(&1.function == "analyze"))
      iex> analyze.signature
      "func(input: string) -> text-stats"
      iex> Capsid.Component.signature(analyze)
      "acme:toolkit/text@0.1.0#analyze: func(input: string) -> text-stats"
  """
  @spec exports(t(), keyword()) :: [function_info()]
  def exports(component, opts \\ [])
  def exports(%__MODULE__{exports: exports}, []), do: exports
  def exports(%__MODULE__{} = c, opts), do: named(c, c.exports, :exports, opts)

  @doc """
  What the component needs from the host: its imported functions (root
  imports and functions of imported interfaces, WASI included; see
  `host_imports/1` for only those the host must provide). `named: true` as
  for `exports/2`.

  A resource the component imports (a host resource, implemented in
  Elixir) adds its constructor, methods and statics as functions, and a
  `"[resource-drop]R"` entry that the host may leave out (see
  `Capsid.Resource`).

      iex> component = Capsid.Component.load!(Capsid.Guests.path(:toolkit))
      iex> Enum.find(Capsid.Component.imports(component), &(&1.name == "log")).params
      [{"level", {:enum, ["debug", "info", "warn", "error"]}}, {"msg", :string}]
  """
  @spec imports(t(), keyword()) :: [function_info()]
  def imports(component, opts \\ [])
  def imports(%__MODULE__{imports: imports}, []), do: imports
  def imports(%__MODULE__{} = c, opts), do: named(c, c.imports, :imports, opts)

  # `named: true`: each function also gets `:signature` (WIT with the type
  # names) and `:docs`, from the component's decoded WIT.
  defp named(component, functions, which, opts) do
    Capsid.Options.validate!(opts, [:named], "Capsid.Component.#{which}/2")

    with true <- Keyword.get(opts, :named, false),
         {:ok, api} <- api(component) do
      by_name =
        for item <- Map.fetch!(api, which), {name, f} <- wit_functions(item), into: %{} do
          {name, %{signature: f.signature, docs: f.docs}}
        end

      Enum.map(functions, &Map.merge(&1, Map.get(by_name, &1.name, %{signature: nil, docs: nil})))
    else
      _ -> functions
    end
  end

  defp wit_functions({:function, f}), do: [{f.name, f}]
  defp wit_functions({:interface, i}), do: for(f <- i.function, do: {"#{i.key}##{f.name}", f})
  defp wit_functions(_type), do: []

  @doc """
  The imports that the host must provide in `:imports` (see
  `Capsid.Instance`): those of `imports/1` that are not WASI, which Capsid
  provides itself, nor a host resource's optional `"[resource-drop]R"`.

      iex> component = Capsid.Component.load!(Capsid.Guests.path(:toolkit))
      iex> Capsid.Component.host_imports(component) |> Enum.map(& &1.name)
      ["log", "get-config"]
  """
  @spec host_imports(t()) :: [function_info()]
  def host_imports(%__MODULE__{imports: imports}) do
    Enum.reject(
      imports,
      &(match?(%{interface: "wasi:" <> _}, &1) or
          match?(%{function: "[resource-drop]" <> _}, &1))
    )
  end

  @doc """
  The component's API as WIT text, with its type names and doc comments,
  as `wasm-tools component wit` prints it: the component's world (named
  `root`), then every package it uses. Takes a component, a path or wasm
  bytes.

      iex> {:ok, wit} = Capsid.Component.describe(Capsid.Guests.path(:toolkit))
      iex> wit =~ "export add: func(a: s32, b: s32) -> s32;"
      true
      iex> wit =~ "analyze: func(input: string) -> text-stats;"
      true
  """
  @spec describe(t() | Path.t() | binary()) :: {:ok, String.t()} | {:error, Error.t()}
  def describe(component_or_source) do
    with {:ok, api} <- api(component_or_source), do: {:ok, api.wit}
  end

  @doc "Like `describe/1`, but raises on error."
  @spec describe!(t() | Path.t() | binary()) :: String.t()
  def describe!(component_or_source) do
    case describe(component_or_source) do
      {:ok, wit} -> wit
      {:error, e} -> raise e
    end
  end

  @doc false
  # The decoded WIT as data (what `Capsid.Bindings` generates code from):
  # `%{wit, world, docs, exports, imports, types}`, see host_nif/src/wit.rs.
  @spec api(t() | Path.t() | binary()) :: {:ok, map()} | {:error, Error.t()}
  def api(%__MODULE__{bytes: bytes}) when is_binary(bytes), do: api(bytes)

  def api(source) when is_binary(source) do
    with {:ok, bytes} <- read(source) do
      case Native.component_wit(bytes) do
        {:ok, api} -> {:ok, api}
        {:error, {kind, message}} -> {:error, Error.new(kind, message)}
      end
    end
  end

  @doc """
  The WIT signature of a function from `exports/1` or `imports/1`.

      iex> component = Capsid.Component.load!(Capsid.Guests.path(:toolkit))
      iex> add = Enum.find(Capsid.Component.exports(component), &(&1.name == "add"))
      iex> Capsid.Component.signature(add)
      "add: func(a: s32, b: s32) -> s32"
  """
  @spec signature(function_info()) :: String.t()
  def signature(%{name: name, signature: wit}) when is_binary(wit), do: "#{name}: #{wit}"

  def signature(%{name: name, params: params, result: result}),
    do: "#{name}: #{Types.signature(params, result)}"

  defp function_info({name, interface, function, params, result}) do
    %{name: name, interface: interface, function: function, params: params, result: result}
  end

  @doc false
  # Bytes start with the wasm magic. Anything else is a path if such a file
  # exists; otherwise it is bad bytes (a 404 page, say), or a missing file
  # when it looks like a path.
  def read(<<"\0asm", _::binary>> = bytes), do: {:ok, bytes}

  def read(path) do
    if printable_path?(path) do
      # Only regular files are read: a FIFO would block forever, a device
      # would never end.
      case File.stat(path) do
        {:ok, %File.Stat{type: :regular, size: size}} ->
          max = Application.get_env(:capsid, :max_component_bytes, @max_component_bytes)

          if size > max do
            {:error,
             Error.new(
               :resource_limit,
               "#{path} is #{size} bytes, the limit is #{max} bytes (config :capsid, :max_component_bytes)"
             )}
          else
            file_read(path)
          end

        {:ok, %File.Stat{type: type}} ->
          {:error,
           Error.new(:file_error, "cannot read #{path}: it is a #{type}, not a regular file")}

        {:error, :enoent} ->
          not_a_component(path, "and no file of that name exists")

        {:error, reason} ->
          {:error, Error.new(:file_error, "cannot read #{path}: #{:file.format_error(reason)}")}
      end
    else
      not_a_component(path, "and it is not a file name")
    end
  end

  defp file_read(path) do
    case File.read(path) do
      {:ok, bytes} ->
        {:ok, bytes}

      {:error, reason} ->
        {:error, Error.new(:file_error, "cannot read #{path}: #{:file.format_error(reason)}")}
    end
  end

  defp printable_path?(path) do
    byte_size(path) < 4096 and String.valid?(path) and String.printable?(path) and
      not String.contains?(path, ["\0", "\n"])
  end

  defp not_a_component(data, why) do
    start = data |> binary_part(0, min(byte_size(data), 24)) |> inspect()

    if looks_like_path?(data) do
      {:error, Error.new(:file_error, "cannot read #{data}: no such file or directory")}
    else
      {:error,
       Error.new(
         :invalid_component,
         "not a WebAssembly binary: the data starts with #{start} instead of the magic bytes \"\\0asm\", #{why}"
       )}
    end
  end

  # A short printable string without markup is taken for a file name.
  defp looks_like_path?(data) do
    byte_size(data) < 4096 and String.valid?(data) and String.printable?(data) and
      not String.contains?(data, ["<", ">", "{", "\n"])
  end

  defimpl Inspect do
    def inspect(c, _opts) do
      "#Capsid.Component<sha256:#{String.slice(c.hash, 0, 12)} " <>
        "#{length(c.exports)} exports, #{length(c.imports)} imports, #{c.size} bytes" <>
        if(c.guard_pages, do: ", guard pages", else: "") <>
        if(c.fuel_metering, do: ">", else: ", no fuel metering>")
    end
  end
end
