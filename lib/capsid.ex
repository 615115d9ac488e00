defmodule Capsid do
  @moduledoc """
  Capsid runs WebAssembly components inside the BEAM, sandboxed.

  Rust (or any language) logic compiled to a wasm **component** with a WIT
  interface is loaded by a NIF that hosts wasmtime. Every call runs under
  fuel, time, memory and stack limits, so faulty or hostile guest code can
  trap, loop or allocate without crashing or stalling the VM.

  You are here: `Capsid.call/4` calls a function of a running instance. To
  get one, load a component (`Capsid.Component.load/2`) and start an
  instance (`Capsid.Instance.start_link/1`, supervisable).

      component = Capsid.Component.load!("priv/guests/toolkit.wasm")
      {:ok, pid} = Capsid.Instance.start_link(component: component, imports: %{...})
      {:ok, 3} = Capsid.call(pid, "add", [1, 2])

  ## Function names

  `"add"` finds a root export, or the one exported interface function of
  that name when it is unique; `"acme:toolkit/pricing#quote"` and
  `"acme:toolkit/pricing@0.1.0#quote"` always work. An ambiguous or unknown
  name is an `:unknown_function` error that lists what exists.

  ## Values

  | WIT                    | Elixir                                                         |
  |------------------------|----------------------------------------------------------------|
  | `bool`                 | `true` / `false`                                               |
  | `s8` … `u64`           | integer, range-checked                                         |
  | `f32`, `f64`           | float (integers accepted); `:nan`, `:infinity`, `:neg_infinity` |
  | `char`                 | integer code point (`?a`); surrogates rejected                 |
  | `string`               | UTF-8 binary                                                   |
  | `list<u8>`             | binary (a list of bytes is accepted as an argument)            |
  | `list<T>`              | list                                                           |
  | `tuple<A, B>`          | `{a, b}`                                                       |
  | `record`               | map with atom keys, kebab-case → snake_case                    |
  | `variant`              | `{:case, payload}`, or `:case` for a case without payload      |
  | `enum`                 | atom                                                           |
  | `flags`                | list of atoms (results in declaration order; MapSet accepted)  |
  | `option<T>`            | `nil` or the value; for `option<option<T>>` the outer some is `{:some, v}` |
  | `result<T, E>`         | `{:ok, v}` / `{:error, e}`; without payload `:ok` / `:error`   |

  Names convert with one rule both ways: WIT's kebab-case is Elixir's
  snake_case (`longest-word` ↔ `:longest_word`). Atoms are only created from
  names in the component's own type information, never from guest data.

  ## Results and errors

  `{:ok, value}` means the call ran and returned; a guest's own
  `result<T, E>` comes inside it (`{:ok, {:error, "division by zero"}}`), and
  a function without result gives `{:ok, nil}`. The host refusing the
  request is `{:error, %Capsid.Error{}}`; the guest faulting is
  `{:error, %Capsid.Trap{}}`.
  """

  alias Capsid.{Error, Instance, Trap}

  @doc """
  Calls `function` of the instance `target` (a pid or registered name) with
  `args`, a list with one value per WIT parameter.

  Options narrow the instance's limits for this call only: `:fuel`,
  `:timeout` (ms), `:max_memory` (bytes); and `:queue_timeout` (ms to wait
  for the instance when another call is running).

      iex> component = Capsid.Component.load!(Capsid.Guests.path(:toolkit))
      iex> imports = %{"log" => fn _, _ -> :ok end, "get-config" => fn _ -> nil end}
      iex> {:ok, pid} = Capsid.Instance.start_link(component: component, imports: imports)
      iex> Capsid.call(pid, "add", [1, 2])
      {:ok, 3}
      iex> Capsid.call(pid, "divide", [1, 0])
      {:ok, {:error, "division by zero"}}
      iex> {:error, %Capsid.Error{kind: :bad_argument, message: message}} = Capsid.call(pid, "add", [1, "2"])
      iex> message
      "args[1]: expected s32, got \\"2\\""
  """
  @spec call(Instance.target(), String.t(), list(), keyword()) ::
          {:ok, term()} | {:error, Error.t() | Trap.t()}
  def call(target, function, args, opts \\ [])

  def call(target, function, args, opts) when is_binary(function) and is_list(args) do
    Capsid.Call.call(target, function, args, opts)
  end

  def call(_target, function, args, _opts) do
    {:error,
     Error.new(
       :bad_argument,
       "expected a function name (string) and a list of arguments, got #{inspect(function)} and #{inspect(args)}"
     )}
  end

  @doc """
  Like `call/4`, but returns the value and raises `Capsid.Error` or
  `Capsid.Trap`.

      iex> component = Capsid.Component.load!(Capsid.Guests.path(:toolkit))
      iex> imports = %{"log" => fn _, _ -> :ok end, "get-config" => fn _ -> nil end}
      iex> {:ok, pid} = Capsid.Instance.start_link(component: component, imports: imports)
      iex> Capsid.call!(pid, "slugify", ["Héllo, World!"])
      "hello-world"
      iex> Capsid.call!(pid, "add", [1])
      ** (Capsid.Error) (bad_argument) wrong number of arguments: add takes 2 (add(a: s32, b: s32)), got 1
  """
  @spec call!(Instance.target(), String.t(), list(), keyword()) :: term()
  def call!(target, function, args, opts \\ []) do
    case call(target, function, args, opts) do
      {:ok, value} -> value
      {:error, exception} -> raise exception
    end
  end

  @doc """
  What Capsid holds on this node:

    * `:address_space_reserved` — bytes of address space reserved for linear
      memories and fiber stacks (limit: `config :capsid, :address_space_limit`,
      default 16 TiB);
    * `:mappings` — memory mappings those take (a few per thousand instances);
    * `:memories`, `:stacks` — live linear memories and fiber stacks;
    * `:atoms_created` — atoms created from components' names (limit:
      `config :capsid, :max_atoms_total`, default 100,000);
    * `:compiling` — compilations running now (`:max_concurrent_compiles`);
    * `:ticker_parked` — whether the epoch ticker is asleep (no call running);
    * `:ticker_wakes` — how many times a call has woken the sleeping ticker;
    * `:budgets` — the node budgets' use (`Capsid.Budget.info/0`);
    * `:descriptor_limit` — the process's `RLIMIT_NOFILE`, which the
      descriptors budget is drawn from;
    * `:dirty_conversions` — Capsid's conversions of large values running
      on dirty CPU schedulers now (`:in_use`), and how many may at once
      (`:limit`: one less than the VM's dirty CPU schedulers, so the VM
      keeps one for itself); `:refused` counts the times a caller waited.

      iex> %{mappings: m, atoms_created: a} = Capsid.info()
      iex> is_integer(m) and is_integer(a)
      true
  """
  @spec info() :: %{atom() => non_neg_integer() | boolean() | map()}
  def info, do: Capsid.Native.node_info()

  ## Deployments

  @doc """
  Starts the deployment `name` with the component at `path_or_bytes`, or
  upgrades it if it runs already. See `Capsid.Deployment` for the steps of an
  upgrade: the new version is compiled, checked and started before anything
  changes, and the switch is atomic; on any error the running version keeps
  serving and the error is returned.

  Options: `:size` (instances, default `System.schedulers_online()`),
  `:imports` and the limits of `Capsid.Instance.start_link/1`, `:force`
  (skip the compatibility check), `:cache`, `:guard_pages` and
  `:fuel_metering` (as in `Capsid.Component.load/2`, for a path or bytes),
  `:watch` (redeploy when the file changes; polled every `:watch_interval`
  ms, default 1000), and for an upgrade that shrinks a pool whose state
  moves (`capsid:host/lifecycle`), `merge: fn snapshots -> states end` or
  `drop_state: true` (refused otherwise; see "State across a swap" in
  `Capsid.Deployment`). Options given to an upgrade are merged into the
  deployment's, except `:merge` and `:drop_state`, which apply to that
  upgrade only.

  `:nodes` (a list of connected nodes, or `:all`) deploys on each of them
  at once, over Erlang distribution: see `Capsid.Cluster` for the steps
  (the component's bytes travel once per node, the compatibility check
  runs once, and a node that cannot take the new version fails the whole
  upgrade before any node switches). Without `:nodes`, a deployment that
  other nodes hold is upgraded on every node that holds it; a new one
  starts on this node.

      iex> {:ok, info} = Capsid.deploy(:doc_greeter, Capsid.Guests.path(:greeter_v1), size: 1)
      iex> info.current.version
      1
      iex> Capsid.call(:doc_greeter, "hello", ["Ada"])
      {:ok, "Hello, Ada!"}
      iex> {:ok, _} = Capsid.deploy(:doc_greeter, Capsid.Guests.path(:greeter_v2))
      iex> Capsid.call(:doc_greeter, "hello", ["Ada"])
      {:ok, "Hi Ada, welcome back!"}
      iex> {:ok, _} = Capsid.rollback(:doc_greeter)
      iex> Capsid.call(:doc_greeter, "version", [])
      {:ok, 1}
      iex> Capsid.undeploy(:doc_greeter)
      :ok
  """
  @spec deploy(term(), Path.t() | binary(), keyword()) ::
          {:ok, map()} | {:error, Error.t() | Trap.t()}
  def deploy(name, path_or_bytes, opts \\ []) do
    {nodes, opts} = Keyword.pop(opts, :nodes)

    case {nodes, Capsid.Cluster.remote_nodes(name)} do
      {nil, []} ->
        Capsid.Deployment.deploy(name, path_or_bytes, opts) |> Capsid.Cluster.with_nodes()

      {nil, _} ->
        Capsid.Cluster.deploy(name, path_or_bytes, Capsid.Cluster.nodes(name), opts)

      {nodes, _} ->
        Capsid.Cluster.deploy(name, path_or_bytes, nodes, opts)
    end
  end

  @doc """
  The current and previous versions of a deployment: version number, SHA-256,
  load time and source path of each; with `watch: true`, the watched path
  and the last reload error (`nil` after a successful reload). These are
  this node's, or another node's if this one does not hold the deployment;
  `:nodes` maps every node that serves it to its `%{version, hash,
  previous}` (`previous` is the previous version's hash, or `nil`).
  """
  @spec versions(term()) :: {:ok, map()} | {:error, Error.t()}
  def versions(name), do: Capsid.Cluster.versions(name)

  @doc """
  Swaps back to the previous version (kept compiled in memory), the same way
  as an upgrade, state handoff included. The version rolled back from
  becomes the previous one. A deployment that several nodes serve rolls
  back on all of them, or on none (see `Capsid.Cluster`).
  """
  @spec rollback(term()) :: {:ok, map()} | {:error, Error.t() | Trap.t()}
  def rollback(name), do: Capsid.Cluster.rollback(name)

  @doc "Stops a deployment and all its instances, on every node that serves it."
  @spec undeploy(term()) :: :ok | {:error, Error.t()}
  def undeploy(name) do
    case Capsid.Cluster.undeploy(name) do
      :ok ->
        :ok

      {:error, :not_found} ->
        {:error, Error.new(:instance_down, "no deployment named #{inspect(name)}")}

      {:error, _} = error ->
        error
    end
  end
end
