defmodule Capsid.Pool do
  @moduledoc """
  N instances of one component behind one name, so callers on every
  scheduler run in parallel.

      {:ok, pool} = Capsid.Pool.start_link(component: component, size: 4, imports: imports)
      {:ok, 3} = Capsid.call(pool, "add", [1, 2])

  A call goes to the member picked by the caller's scheduler id, so callers
  on different schedulers use different members without coordinating; a
  busy member is skipped, and when all are busy the caller waits in line on
  its own member. Each member is a `Capsid.Instance` with its own store,
  limits and guest state (state is not shared between members).

  The pool is one supervisable process that owns its members: a member that
  crashes is replaced (a member that traps recycles itself and stays).

  ## Options

    * `:size` — number of members (default `System.schedulers_online()`).
    * `:name` — registers the pool, as for `GenServer`.
    * every option of `Capsid.Instance.start_link/1` (component, imports,
      limits), applied to each member.
  """

  use GenServer

  alias Capsid.{Error, Instance, Native, Trap}

  @doc """
  Starts a pool linked to the caller. Errors as for
  `Capsid.Instance.start_link/1`.

      iex> component = Capsid.Component.load!(Capsid.Guests.path(:faulty))
      iex> {:ok, pool} = Capsid.Pool.start_link(component: component, size: 2, imports: %{"hook" => & &1})
      iex> Capsid.call(pool, "ok", [1])
      {:ok, 2}
      iex> length(Capsid.Pool.members(pool))
      2
  """
  @spec start_link(keyword()) :: GenServer.on_start() | {:error, Error.t() | Trap.t()}
  def start_link(opts) do
    {name, opts} = Keyword.pop(opts, :name)
    {size, opts} = Keyword.pop(opts, :size, System.schedulers_online())

    unless is_integer(size) and size > 0 do
      raise ArgumentError,
            "invalid value for :size: expected a positive integer, got #{inspect(size)}"
    end

    # The first member is prepared here, so a bad component is an error
    # return from start_link; the pool process then takes it over.
    with {:ok, first} <- Instance.prepare(opts) do
      GenServer.start_link(__MODULE__, {size, opts, first, name})
    end
  end

  @doc false
  def child_spec(opts) do
    %{
      id: Keyword.get(opts, :name, __MODULE__),
      start: {__MODULE__, :start_link, [opts]},
      type: :worker
    }
  end

  @doc "The pids of the pool's current members."
  @spec members(GenServer.server()) :: [pid()]
  def members(pool), do: GenServer.call(pool, :members)

  @doc """
  Pool counters: `:size`, `:members`, `:replaced` (members restarted after
  a crash), and the sum of the members' `Capsid.Instance.info/1` counters
  `:calls`, `:recycles` and `:fuel_used`.
  """
  @spec info(GenServer.server()) :: map()
  def info(pool) do
    %{members: members} = state = GenServer.call(pool, :state)
    pids = Enum.map(members, & &1.pid)
    infos = Enum.map(pids, &Instance.info/1)

    %{
      size: length(pids),
      members: pids,
      replaced: state.replaced,
      calls: Enum.sum(Enum.map(infos, & &1.calls)),
      recycles: Enum.sum(Enum.map(infos, & &1.recycles)),
      fuel_used: Enum.sum(Enum.map(infos, & &1.fuel_used))
    }
  end

  @doc false
  # The pool's native resource (what a deployment publishes under its name)
  # and its members' resources.
  def refs(pool), do: GenServer.call(pool, :refs)

  @impl true
  def init({size, opts, first, name}) do
    Process.flag(:trap_exit, true)
    # For a call from another node: how long it may take here at most.
    Capsid.Cluster.remember_limits(first.limits.timeout, first.queue_timeout)

    members = [start_member(first) | for(_ <- 2..size//1, do: start_member(opts))]

    ref = Native.pool_new(Enum.map(members, & &1.ref))

    case Capsid.Registry.register(ref, name) do
      :ok -> {:ok, %{opts: opts, members: members, ref: ref, replaced: 0}}
      {:error, reason} -> {:stop, reason}
    end
  end

  # A member: a `Capsid.Instance` process linked to the pool, and its resource.
  defp start_member(%{ref: ref} = prepared) do
    {:ok, pid} = Instance.start_prepared(prepared)
    %{pid: pid, ref: ref}
  end

  defp start_member(opts) do
    case Instance.prepare(opts) do
      {:ok, prepared} -> start_member(prepared)
      {:error, error} -> exit({:shutdown, error})
    end
  end

  @impl true
  def handle_call(:members, _from, state), do: {:reply, Enum.map(state.members, & &1.pid), state}
  def handle_call(:state, _from, state), do: {:reply, state, state}

  def handle_call(:refs, _from, state),
    do: {:reply, {state.ref, Enum.map(state.members, & &1.ref)}, state}

  @impl true
  def handle_info({:EXIT, pid, _reason}, state) do
    case Enum.find_index(state.members, &(&1.pid == pid)) do
      nil ->
        # Not a member (the parent's exit is handled by gen_server itself).
        {:noreply, state}

      index ->
        member = start_member(state.opts)
        Native.pool_replace(state.ref, index, member.ref)
        members = List.replace_at(state.members, index, member)
        {:noreply, %{state | members: members, replaced: state.replaced + 1}}
    end
  end

  @impl true
  def terminate(_reason, state) do
    Capsid.Registry.unregister()
    Native.pool_retire(state.ref)
    # Members would follow their parent anyway; stopping them here makes the
    # pool's shutdown synchronous.
    for %{pid: pid} <- state.members do
      try do
        GenServer.stop(pid, :shutdown)
      catch
        :exit, _ -> :ok
      end
    end

    :ok
  end
end
