defmodule Capsid.Resource do
  @moduledoc """
  A handle to a guest resource: an object with identity and state that lives
  inside a component instance (a cart, a parser, a connection), as WIT's
  `resource` types describe them.

  A call whose result is an `own<R>` returns a handle; `own<R>` and
  `borrow<R>` parameters take one, anywhere in a value (lists, records,
  options, results, variants). Constructors, methods and statics go by
  their canonical names, like any other function:

      {:ok, cart} = Capsid.call(instance, "[constructor]cart", ["ada"])
      {:ok, nil} = Capsid.call(instance, "[method]cart.add", [cart, "apple", 2])
      {:ok, both} = Capsid.call(instance, "[static]cart.merge", [cart, other])
      :ok = Capsid.Resource.drop(cart)

  ## Lifetimes

    * `drop/1` drops the object now: the guest's destructor runs before
      `drop/1` returns.
    * A handle that is garbage-collected in Elixir is dropped in the guest
      soon after, on the instance's own time: its `Capsid.Instance` process
      is told, and runs the destructors queued so far as a call of its own,
      under the instance's limits (`:timeout`, `:fuel`, `:max_memory`),
      taking its turn like any caller. A destructor never runs inside
      another caller's call: it cannot trap that call, spend its fuel or
      deadline, or show it its stderr. How it went is a
      `[:capsid, :instance, :destructors]` telemetry event (see
      `Capsid.Telemetry`), and a trap is also logged as a warning (with
      the guest's stderr, up to 4 KiB). Its output goes where the
      instance's `wasi: [stdout: ..., stderr: ...]` sends output.
    * A destructor that traps recycles the instance, as any trap does: the
      guest's state and every handle of that instance are gone (later uses
      are `:stale_resource`), and the next call starts from a fresh
      instance. For a pool, only the member that made the handle.
    * Passing a handle as an `own<R>` argument gives the object to the guest:
      the handle is used up. Passing it as `borrow<R>` lends it for the call.
    * A handle is bound to the instance that made it. Used after `drop/1`,
      after being given away, after its instance recycled (a trap resets
      the guest, its objects with it), after a hot swap replaced its
      instance, or with another instance, a call returns
      `{:error, %Capsid.Error{kind: :stale_resource}}`. Nothing crashes and
      nothing leaks.
    * Only handles that Capsid made are accepted: a map that looks like one,
      or another reference, is a `:bad_argument`.

  A call with handles through a pool or a deployment runs on the member that
  made them.

  ## Host resources

  A resource the component *imports* is implemented in Elixir, through the
  same `imports:` map as functions, by canonical names (qualified, or short
  when unique). Its state is any term: what the constructor returns (or any
  import whose result is an `own<R>`). Methods get it first:

      imports: %{
        "[constructor]ledger" => fn name -> {:ledger, name, Agent.start_link(...)} end,
        "[method]ledger.record" => fn {:ledger, _, agent}, entry -> ... end,
        "[static]ledger.open" => fn name -> {:ledger, name, ...} end,
        # optional: the guest dropped its handle
        "[resource-drop]ledger" => fn {:ledger, _, agent} -> Agent.stop(agent) end
      }

    * The guest holds handles, never the terms: each store keeps its own
      table, so a guest cannot forge a handle or reuse one it gave up.
    * When the guest drops its handle, `"[resource-drop]R"` runs with the
      state (if given), in the call that dropped it; a failing drop function
      fails that call as a failing import does.
    * A host resource that comes back to Elixir as `own<R>` (in a call's
      result, or as an import's argument) is its term again, and the guest no
      longer holds it: the drop function does not run for it, Elixir has it.
      As `borrow<R>` (a method's `self`) it is the term, and stays the guest's.
    * An export that takes an `own<R>` or `borrow<R>` of a host resource
      takes the term: owned, the guest keeps it (and drops it some day);
      borrowed, it is lent for the call.
    * A guest holds at most `max_handles` host resources at a time (see
      `Capsid.Limits`); one more traps the call (`:memory_limit`, naming the
      limit). When the instance recycles or stops, its host resources go
      with its store, without running the drop function.
    * The state is copied in and out, as any term passed to a call: keep it
      small (a pid, a reference, a key).
  """

  @enforce_keys [:ref, :name]
  defstruct [:ref, :name, :instance]

  @typedoc """
  `name` is the resource type's WIT name; `instance` the pid of the
  `Capsid.Instance` that holds the object. `ref` is opaque.
  """
  @type t :: %__MODULE__{ref: reference(), name: String.t(), instance: pid() | nil}

  @doc """
  Drops the object: its destructor runs in the guest before this returns,
  in a call of the caller's own (under its limits; a trap in the
  destructor is this call's `Capsid.Trap`), which runs no other
  destructor. A handle already dropped or given to the guest is
  `:stale_resource`.

      {:ok, cart} = Capsid.call(instance, "[constructor]cart", ["ada"])
      :ok = Capsid.Resource.drop(cart)
      {:error, %Capsid.Error{kind: :stale_resource}} = Capsid.Resource.drop(cart)
  """
  @spec drop(t()) :: :ok | {:error, Capsid.Error.t() | Capsid.Trap.t()}
  def drop(%__MODULE__{instance: instance, name: name} = handle) when is_pid(instance) do
    case Capsid.call(instance, "[resource-drop]#{name}", [handle]) do
      {:ok, nil} ->
        :ok

      {:error, %Capsid.Error{kind: :busy}} = error ->
        # The handle is dropped but its destructor did not get to run: the
        # instance runs it on its own time, as for a collected handle.
        send(instance, {:capsid_drops, nil})
        error

      {:error, _} = error ->
        error
    end
  end

  def drop(%__MODULE__{} = handle) do
    {:error, Capsid.Error.new(:stale_resource, "the #{handle.name} handle has no live instance")}
  end

  @doc "Like `drop/1`, but raises on error."
  @spec drop!(t()) :: :ok
  def drop!(handle) do
    case drop(handle) do
      :ok -> :ok
      {:error, e} -> raise e
    end
  end

  defimpl Inspect do
    def inspect(%{name: name, instance: instance}, _opts) do
      "#Capsid.Resource<#{name} in #{Kernel.inspect(instance)}>"
    end
  end
end
