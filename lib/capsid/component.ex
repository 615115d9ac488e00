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
  defstruct [:ref, :hash, :exports, :imports, :size, cache: :disabled]

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
          cache: cache_outcome()
        }

  @doc """
  Loads and compiles a component from a file path or from the wasm bytes
  themselves (a binary starting with `"\\0asm"`).

  Returns `{:error, %Capsid.Error{kind: :invalid_component}}` for core wasm
  modules, garbage and truncated input, and `kind: :file_error` when the
  file cannot be read.

  ## Options

    * `:cache` — where compiled code is cached on disk: `true` (the default:
      the `:cache_dir` application env, else the user cache directory,
      `~/.cache/capsid` on Linux), a directory, or `false`. The cache is keyed
      by the component's SHA-256 and the engine's configuration; each artifact
      is authenticated (HMAC-SHA256, secret key in the cache directory) before
      it is loaded, so a corrupted or tampered file is discarded and
      recompiled, never loaded. `component.cache` says what happened.

      iex> {:ok, %Capsid.Component{}} = Capsid.Component.load(Capsid.Guests.path(:toolkit))
      iex> {:error, %Capsid.Error{kind: :file_error}} = Capsid.Component.load("/no/such.wasm")
      iex> {:error, %Capsid.Error{kind: :invalid_component}} = Capsid.Component.load(<<0, "asm", 1, 0, 0, 0>>)
  """
  @spec load(Path.t() | binary(), keyword()) :: {:ok, t()} | {:error, Error.t()}
  def load(path_or_bytes, opts \\ [])

  def load(path_or_bytes, opts) when is_binary(path_or_bytes) and is_list(opts) do
    Capsid.Options.validate!(opts, [:cache], "Capsid.Component.load/2")
    cache_dir = cache_dir!(Keyword.get(opts, :cache, true))

    with {:ok, bytes} <- read(path_or_bytes) do
      t0 = System.monotonic_time()

      case Native.component_compile(bytes, cache_dir) do
        {:ok, {ref, hash, exports, imports, cache}} ->
          Capsid.Telemetry.execute(
            [:capsid, :component, :load],
            %{duration: System.monotonic_time() - t0, size: byte_size(bytes)},
            %{hash: hash, cache: cache}
          )

          {:ok,
           %__MODULE__{
             ref: ref,
             hash: hash,
             exports: Enum.map(exports, &function_info/1),
             imports: Enum.map(imports, &function_info/1),
             size: byte_size(bytes),
             cache: cache
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

  @doc """
  The component's exported functions with their WIT types.

      iex> component = Capsid.Component.load!(Capsid.Guests.path(:toolkit))
      iex> add = Enum.find(Capsid.Component.exports(component), &(&1.name == "add"))
      iex> add.params
      [{"a", :s32}, {"b", :s32}]
  """
  @spec exports(t()) :: [function_info()]
  def exports(%__MODULE__{exports: exports}), do: exports

  @doc """
  What the component needs from the host: its imported functions (root
  imports and functions of imported interfaces, WASI included).

      iex> component = Capsid.Component.load!(Capsid.Guests.path(:toolkit))
      iex> Enum.find(Capsid.Component.imports(component), &(&1.name == "log")).params
      [{"level", {:enum, ["debug", "info", "warn", "error"]}}, {"msg", :string}]
  """
  @spec imports(t()) :: [function_info()]
  def imports(%__MODULE__{imports: imports}), do: imports

  @doc """
  The WIT signature of a function from `exports/1` or `imports/1`.

      iex> component = Capsid.Component.load!(Capsid.Guests.path(:toolkit))
      iex> add = Enum.find(Capsid.Component.exports(component), &(&1.name == "add"))
      iex> Capsid.Component.signature(add)
      "add: func(a: s32, b: s32) -> s32"
  """
  @spec signature(function_info()) :: String.t()
  def signature(%{name: name, params: params, result: result}),
    do: "#{name}: #{Types.signature(params, result)}"

  @doc """
  The default cache directory: the `:cache_dir` application env, else the
  user cache directory.
  """
  @spec default_cache_dir() :: Path.t()
  def default_cache_dir do
    Application.get_env(:capsid, :cache_dir) ||
      :filename.basedir(:user_cache, "capsid")
  end

  defp cache_dir!(true), do: default_cache_dir()
  defp cache_dir!(false), do: nil
  defp cache_dir!(dir) when is_binary(dir), do: dir

  defp cache_dir!(other) do
    raise ArgumentError,
          "invalid value for :cache: expected true, false or a directory, got #{inspect(other)}"
  end

  defp function_info({name, interface, function, params, result}) do
    %{name: name, interface: interface, function: function, params: params, result: result}
  end

  # Bytes start with the wasm magic; anything else is a path, unless it
  # cannot be one (NUL bytes, not UTF-8), in which case it is bad bytes.
  defp read(<<"\0asm", _::binary>> = bytes), do: {:ok, bytes}

  defp read(path) do
    if String.valid?(path) and not String.contains?(path, <<0>>) do
      case File.read(path) do
        {:ok, bytes} ->
          {:ok, bytes}

        {:error, reason} ->
          {:error, Error.new(:file_error, "cannot read #{path}: #{:file.format_error(reason)}")}
      end
    else
      {:error,
       Error.new(
         :invalid_component,
         "not a WebAssembly binary: expected the magic bytes \"\\0asm\" at the start"
       )}
    end
  end

  defimpl Inspect do
    def inspect(c, _opts) do
      "#Capsid.Component<sha256:#{String.slice(c.hash, 0, 12)} " <>
        "#{length(c.exports)} exports, #{length(c.imports)} imports, #{c.size} bytes>"
    end
  end
end
