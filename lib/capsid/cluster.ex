defmodule Capsid.Cluster do
  @moduledoc """
  Deployments across a BEAM cluster, over Erlang distribution: nothing but
  OTP (`:pg` for membership, `spawn_request` for calls, `:global` for a lock).

      {:ok, info} = Capsid.deploy(:calc, "priv/calc.wasm", nodes: [node() | Node.list()])
      Capsid.call(:calc, "add", [1, 2])   # on any node of the cluster

  ## Membership

  Every serving deployment joins the `:pg` group `{:deployment, name}` of
  the scope `Capsid.Cluster`, so each node knows which nodes hold which
  deployment (`nodes/1`); `Capsid.versions/1` says which version each one
  runs. A node that goes down leaves every group at once.

  ## Calls

  `Capsid.call/4` with a deployment's name runs on this node's instances
  when it holds the deployment. Otherwise it goes to another node that holds
  it, picked at random (the load spreads); a node that is down or no longer
  holds it is skipped and the next one tried (also when a node goes down
  while it runs a call: like any request to a machine that fails, that
  call may have run in part before it is tried again elsewhere). A remote
  call has the same
  results and errors as a local one. Its `:timeout` (plus `:queue_timeout`,
  if given) bounds the whole remote call, network included: past it the
  caller gets a `%Capsid.Trap{kind: :timeout}` and the remote call is
  stopped. With or without a `:timeout`, the caller waits no longer than
  what the remote instance's own limits allow (its `:queue_timeout` plus
  its `:timeout`, narrowed by the call's options) plus a margin of 2 s (and
  1 ms per 10 KB of arguments or result, for their time on the wire), and
  a node has as long to take the call at all: a node that froze (SIGSTOP, a
  stalled VM) or is cut off gives the caller `{:error, %Capsid.Error{kind:
  :timeout}}` naming the node, and the call is stopped there (when it
  wakes up), instead of a wait until Erlang distribution declares the node
  down (`net_ticktime`, about a minute). Only a remote instance with
  `timeout: :infinity` leaves that to distribution. A pid of an instance on
  another node works as a target too.

  Values travel as Erlang terms. Resource handles (`Capsid.Resource`) belong
  to their node's instance and are not sent across.

  ## Deploys, upgrades and rollbacks across nodes

  `Capsid.deploy(name, source, nodes: nodes)` runs in four steps, under a
  `:global` lock on the name (two cluster-wide deploys of one name never
  interleave):

  1. **Load.** Each node gets the component's bytes once, unless it holds
     that component already (addressed by SHA-256, e.g. the version a
     rollback would return to); a node whose disk cache has the compiled
     artifact loads it without compiling.
  2. **Check, once.** The new version must keep every function each node's
     running version exports, with the same type (unless `force: true`).
  3. **Prepare.** Each node starts the new version's instances (and hands
     the state over if both versions export `capsid:host/lifecycle`), but
     keeps serving the running one. A node without the deployment starts
     it without serving.
  4. **Switch.** Once every node is prepared, each switches atomically, as a
     single-node upgrade does: no call fails because of the upgrade, and
     when `deploy` returns every listed node serves the new version.

  **A node that cannot take the new version fails the whole upgrade**: if
  any node fails in steps 1 to 3 (compile error, link error, a trapping
  state handoff, a node that is down), every prepared version is stopped,
  no node switches, and the error names each node and what went wrong.

  A node that dies during step 4 takes its instances with it; the others
  switch, and the result lists it under `:lost`. A node already running the
  same component with the same options is left as it is (`:unchanged`), so
  deploying again with a node added to `:nodes` only starts the new node.

  `Capsid.rollback/1` and `Capsid.undeploy/1` act on every node that holds
  the deployment, rollbacks through the same steps.

  ## What every node needs

  Capsid itself (the same version), connected nodes (`Node.connect/1`),
  and, for `:imports`, functions that exist on every node: named functions
  (`&MyApp.Hooks.log/2`, `{MyApp.Hooks, :log}`) of modules loaded there. An
  anonymous function is sent as a reference to the module that defined it.
  """

  alias Capsid.{Component, Deployment, Error, Registry, Telemetry, Trap}

  @scope __MODULE__
  # Time for a remote guest's own timeout trap to arrive before the caller
  # gives up on its own.
  @grace 100
  # How long a caller waits, beyond what the remote instance's limits allow
  # (its queue_timeout and timeout), for a remote call's answer: argument
  # and result conversions, the trip back, a busy node. Also how long a
  # node has to take a call at all.
  @margin 2_000
  # Large arguments and results take time on the wire: the margin grows by
  # 1 ms per 10 KB (10 MB/s, a slow link).
  @bytes_per_ms 10_000
  # How long a versions/undeploy request waits for one node.
  @query_timeout 15_000

  @doc false
  def child_spec(_), do: %{id: @scope, start: {:pg, :start_link, [@scope]}}

  @doc false
  # The calling deployment process serves `name` on this node, at the
  # version `hash`.
  def join(name, hash) do
    :ok = :pg.join(@scope, group(name), self())
    :pg.join(@scope, {:version, name, hash}, self())
  end

  @doc false
  # It switched from version `old` to `new`.
  def switch(name, old, new) do
    :ok = :pg.join(@scope, {:version, name, new}, self())
    _ = :pg.leave(@scope, {:version, name, old}, self())
    :ok
  end

  @doc false
  # It stops serving (it also leaves when it exits).
  def leave(name, hash) do
    _ = :pg.leave(@scope, group(name), self())
    _ = :pg.leave(@scope, {:version, name, hash}, self())
    :ok
  end

  defp group(name), do: {:deployment, name}

  @doc """
  The nodes that serve the deployment `name` (this one included, if it
  does), sorted.

      iex> Capsid.Cluster.nodes(:no_such_deployment)
      []
  """
  @spec nodes(term()) :: [node()]
  def nodes(name) do
    :pg.get_members(@scope, group(name)) |> Enum.map(&node/1) |> Enum.uniq() |> Enum.sort()
  end

  @doc """
  The version each node serves the deployment `name` at, as this node
  knows it (from the membership, without asking them): `%{node =>
  sha256}`. `Capsid.versions/1` asks each node for more.

      iex> Capsid.Cluster.serving(:no_such_deployment)
      %{}
  """
  @spec serving(term()) :: %{node() => String.t()}
  def serving(name) do
    # which_groups/1 lists every group: fine for a question asked rarely,
    # never on the call path.
    for {:version, ^name, hash} <- :pg.which_groups(@scope),
        pid <- :pg.get_members(@scope, {:version, name, hash}),
        into: %{},
        do: {node(pid), hash}
  end

  @doc false
  def remote_nodes(name), do: nodes(name) -- [node()]

  ## Calls

  @doc false
  # A call whose target this node does not hold: a deployment name (tried
  # on the nodes that hold it, in random order) or a pid of another node.
  # Returns `{result, fuel_used}` as `Capsid.Call` does.
  def call(pid, function, args, opts) when is_pid(pid) do
    case remote(node(pid), pid, function, args, opts) do
      {:elsewhere, why} ->
        {{:error,
          Error.new(
            :instance_down,
            "#{inspect(pid)} is not a live Capsid instance (on node #{node(pid)}: #{why})"
          )}, 0}

      result ->
        result
    end
  end

  def call(name, function, args, opts) do
    case remote_nodes(name) do
      [] ->
        {{:error, Error.new(:instance_down, "#{inspect(name)} is not a live Capsid instance")}, 0}

      nodes ->
        try_nodes(Enum.shuffle(nodes), name, function, args, opts, [])
    end
  end

  defp try_nodes([], name, _function, _args, _opts, tried) do
    {{:error,
      Error.new(
        :instance_down,
        "no node serves #{inspect(name)} any more (tried " <>
          Enum.map_join(Enum.reverse(tried), ", ", fn {n, why} -> "#{n}: #{why}" end) <> ")"
      )}, 0}
  end

  defp try_nodes([node | rest], name, function, args, opts, tried) do
    case remote(node, name, function, args, opts) do
      {:elsewhere, why} -> try_nodes(rest, name, function, args, opts, [{node, why} | tried])
      result -> result
    end
  end

  defp remote(node, target, function, args, opts) do
    own = wait(opts)
    t0 = System.monotonic_time()
    now = System.monotonic_time(:millisecond)
    # Answers come to an alias: once the caller gives up, late ones are
    # dropped instead of piling up in its mailbox.
    reply_to = :erlang.alias()

    # Asynchronous (`spawn_monitor/4` to another node waits for the reply,
    # which a frozen node never sends): the monitor's reference is `req`.
    req =
      :erlang.spawn_request(
        node,
        __MODULE__,
        :serve,
        [self(), reply_to, target, function, args, opts],
        [:monitor]
      )

    waiting = %{
      node: node,
      req: req,
      reply_to: reply_to,
      pid: nil,
      own: own,
      own_deadline: deadline(now, own),
      # Until the node says what its instance allows, it has @margin (and
      # the time its arguments take on the wire) to acknowledge the call.
      bound: nil,
      bound_deadline: now + @margin + div(:erlang.external_size(args), @bytes_per_ms)
    }

    result = await(waiting)
    :erlang.unalias(reply_to)

    case result do
      {:raised, kind, reason, stack} ->
        :erlang.raise(kind, reason, stack)

      {:elsewhere, _} = elsewhere ->
        elsewhere

      :elsewhere ->
        {:elsewhere, "not held there"}

      {value, _fuel} = done ->
        Telemetry.execute(
          [:capsid, :cluster, :call],
          %{duration: System.monotonic_time() - t0},
          %{target: target, node: node, function: function, result: outcome(value)}
        )

        done
    end
  end

  # Waits for the remote call's answer, at most until the caller's own
  # deadline or what the remote instance's limits allow plus @margin,
  # whichever comes first. A frozen node (SIGSTOP, a stalled VM) keeps its
  # connection up until `net_ticktime` notices: without this bound the
  # caller would wait that long (about a minute by default).
  defp await(%{req: req, reply_to: reply_to} = w) do
    receive do
      {^reply_to, :bound, bound} ->
        now = System.monotonic_time(:millisecond)
        await(%{w | bound: bound, bound_deadline: deadline(now, plus(bound, @margin))})

      # A large result is on its way: its time on the wire is added.
      {^reply_to, :sending, size} ->
        now = System.monotonic_time(:millisecond)
        extended = deadline(now, @margin + div(size, @bytes_per_ms))
        await(%{w | bound_deadline: max_deadline(w.bound_deadline, extended)})

      {^reply_to, :result, result} ->
        Process.demonitor(req, [:flush])
        flush_reply(req)
        result

      {:spawn_reply, ^req, :ok, pid} ->
        await(%{w | pid: pid})

      {:spawn_reply, ^req, :error, :noconnection} ->
        {:elsewhere, "node down"}

      {:spawn_reply, ^req, :error, reason} ->
        {:elsewhere, inspect(reason)}

      {:DOWN, ^req, :process, _, reason} ->
        down(reason, w.node)
    after
      remaining(min_deadline(w.own_deadline, w.bound_deadline)) -> gave_up(w)
    end
  end

  defp down(:noconnection, _node), do: {:elsewhere, "node down"}

  # Capsid is not loaded there.
  defp down({:undef, [{__MODULE__, :serve, _, _} | _]}, _node),
    do: {:elsewhere, "Capsid is not running there"}

  # Killed there, by something else than Capsid: it may have run.
  defp down(reason, node) do
    {{:error,
      Error.new(
        :instance_down,
        "the call's process on node #{node} was killed (#{inspect(reason, limit: 10)})"
      )}, 0}
  end

  # Stops the remote call (on a frozen node, when it wakes up) and says why.
  defp gave_up(w) do
    case w.pid do
      nil ->
        # Not started yet: abandoning kills it when it starts; false means
        # its reply has just come.
        unless :erlang.spawn_request_abandon(w.req) do
          receive do
            {:spawn_reply, req, :ok, pid} when req == w.req -> Process.exit(pid, :kill)
          after
            0 -> :ok
          end
        end

      pid ->
        Process.exit(pid, :kill)
    end

    Process.demonitor(w.req, [:flush])
    {{:error, timeout_error(w)}, 0}
  end

  defp flush_reply(req) do
    receive do
      {:spawn_reply, ^req, _, _} -> :ok
    after
      0 -> :ok
    end
  end

  defp timeout_error(%{own_deadline: own, bound_deadline: bound} = w)
       when own != :infinity and (bound == :infinity or own <= bound) do
    %Trap{
      kind: :timeout,
      message:
        "no answer from node #{w.node} within #{w.own} ms (the call's timeout); the remote call was stopped"
    }
  end

  defp timeout_error(%{bound: nil} = w) do
    Error.new(
      :timeout,
      "node #{w.node} did not take the call within #{@margin} ms (plus 1 ms per 10 KB of " <>
        "arguments): frozen, overloaded or cut off?; the call was abandoned there"
    )
  end

  defp timeout_error(w) do
    Error.new(
      :timeout,
      "no answer from node #{w.node} within #{w.bound + @margin} ms: the remote instance's " <>
        "timeout and queue_timeout (#{w.bound} ms) plus a #{@margin} ms margin (frozen, " <>
        "overloaded or cut off?); the remote call was stopped"
    )
  end

  defp deadline(_now, :infinity), do: :infinity
  defp deadline(now, ms), do: now + ms

  defp plus(:infinity, _), do: :infinity
  defp plus(a, b), do: a + b

  defp max_deadline(:infinity, _), do: :infinity
  defp max_deadline(a, b), do: max(a, b)

  defp min_deadline(:infinity, b), do: b
  defp min_deadline(a, :infinity), do: a
  defp min_deadline(a, b), do: min(a, b)

  defp remaining(:infinity), do: :infinity
  defp remaining(deadline), do: max(deadline - System.monotonic_time(:millisecond), 0)

  defp outcome({:ok, _}), do: :ok
  defp outcome({:error, %Trap{} = trap}), do: {:trap, trap}
  defp outcome({:error, error}), do: {:error, error}

  # The caller's bound on a remote call: its timeout (and queue timeout),
  # or :infinity (the remote node's own limits bound it, see `await/1`).
  defp wait(opts) do
    case {Keyword.get(opts, :timeout), Keyword.get(opts, :queue_timeout, 0)} do
      {t, q} when is_integer(t) and is_integer(q) -> t + q + @grace
      _ -> :infinity
    end
  end

  @doc false
  # Runs on the node the call was sent to; never forwards it further. First
  # tells the caller how long the call may take here at most (the target's
  # limits, narrowed by the call's options), then answers.
  def serve(caller, reply_to, target, function, args, opts) do
    send(reply_to, {reply_to, :bound, bound(target, opts)})
    result = serve_here(caller, target, function, args, opts)
    size = :erlang.external_size(result)
    if size > 1_000_000, do: send(reply_to, {reply_to, :sending, size})
    send(reply_to, {reply_to, :result, result})
  end

  defp serve_here(caller, target, function, args, opts) do
    Capsid.Call.call_here(caller, target, function, args, opts)
  catch
    kind, reason -> {:raised, kind, reason, __STACKTRACE__}
  end

  @limits {__MODULE__, :limits}

  @doc false
  # Called by each instance, pool and deployment process with its options:
  # what a call to it may take at most, for `bound/2` on this node.
  def remember_limits(timeout, queue_timeout) do
    Process.put(@limits, {ms(timeout), ms(queue_timeout)})
    {ms(timeout), ms(queue_timeout)}
  end

  @doc false
  def limits_of(opts) when is_list(opts) do
    {Keyword.get(opts, :timeout, Capsid.Limits.defaults()[:timeout]),
     Keyword.get(opts, :queue_timeout, Capsid.Instance.default_queue_timeout())}
  end

  # `Capsid.Limits` keeps :infinity as the largest u64.
  defp ms(ms) when is_integer(ms) and ms >= 0 and ms < 0xFFFF_FFFF_FFFF_FFFF, do: ms
  defp ms(_), do: :infinity

  # The longest the call may take on this node: its wait for a turn plus
  # its run, in ms (:infinity when a limit is, or the target is unknown).
  defp bound(target, opts) do
    case limits_here(target) do
      {timeout, queue_timeout} ->
        timeout = narrow(timeout, Keyword.get(opts, :timeout))
        queue_timeout = Keyword.get(opts, :queue_timeout, queue_timeout)

        if is_integer(timeout) and is_integer(queue_timeout),
          do: timeout + queue_timeout,
          else: :infinity

      nil ->
        :infinity
    end
  end

  defp narrow(own, nil), do: own
  defp narrow(:infinity, call), do: call
  defp narrow(own, call) when is_integer(call), do: min(own, call)
  defp narrow(own, _), do: own

  defp limits_here(pid) when is_pid(pid) and node(pid) == node() do
    case Process.info(pid, :dictionary) do
      {:dictionary, dictionary} ->
        case List.keyfind(dictionary, @limits, 0) do
          {_, limits} -> limits
          nil -> nil
        end

      nil ->
        nil
    end
  end

  defp limits_here(pid) when is_pid(pid), do: nil

  defp limits_here(name) do
    case Elixir.Registry.lookup(Capsid.Deployments, name) do
      [{_pid, {_, _} = limits}] -> limits
      _ -> nil
    end
  end

  @doc false
  # Called in a served call's process when the call goes on past its first
  # step: a caller that dies, or whose node goes down, cancels the call here
  # as it would on its own node (the instance is freed at once, the guest
  # stopped: a `:cancelled` trap).
  def watch(caller) do
    server = self()

    spawn(fn ->
      c = Process.monitor(caller)
      s = Process.monitor(server)

      receive do
        {:DOWN, ^c, _, _, _} -> Process.exit(server, :kill)
        {:DOWN, ^s, _, _, _} -> :ok
      end
    end)
  end

  ## Deploys

  @doc false
  # `Capsid.deploy/3` with `nodes:`, or on a deployment other nodes hold.
  def deploy(name, source, nodes, opts) do
    nodes = nodes!(nodes)
    Capsid.Options.validate!(opts, Deployment.deploy_keys(), "Capsid.deploy/3")
    # Bad limits raise here; the rest is checked by each node.
    _ = Capsid.Limits.new(opts)
    _ = Component.flavor!(opts)

    if Keyword.get(opts, :watch, false) and nodes != [node()] do
      raise ArgumentError,
            "watch: true watches a file on this node; it cannot be combined with other nodes in :nodes"
    end

    if nodes == [node()] do
      Deployment.deploy(name, source, opts) |> with_nodes()
    else
      with {:ok, bytes} <- bytes(source) do
        hash = Capsid.NIF.sha256(bytes)
        origin = if is_binary(source) and source != bytes, do: source
        # A loaded component is compiled for the same engine everywhere.
        opts =
          case source do
            %Component{} = c ->
              opts
              |> Keyword.put(:guard_pages, c.guard_pages)
              |> Keyword.put(:fuel_metering, c.fuel_metering)

            _ ->
              opts
          end

        across(name, :swap, nodes, %{hash: hash, bytes: bytes, source: origin, opts: opts})
      end
    end
  end

  @doc false
  # `Capsid.rollback/1`: on every node that holds the deployment.
  def rollback(name) do
    case nodes(name) do
      nodes when nodes in [[], [node()]] ->
        Deployment.call_server(name, :rollback) |> with_nodes()

      nodes ->
        across(name, :rollback, nodes, %{hash: nil, bytes: nil, source: nil, opts: []})
    end
  end

  @doc false
  # `Capsid.undeploy/1`: on every node that holds the deployment.
  def undeploy(name) do
    case remote_nodes(name) do
      [] ->
        Deployment.undeploy(name)

      remote ->
        local = Deployment.undeploy(name)
        results = :erpc.multicall(remote, Deployment, :undeploy, [name], @query_timeout)

        if Enum.any?([{:ok, local} | results], &match?({:ok, :ok}, &1)),
          do: :ok,
          else: local
    end
  end

  @doc false
  # `Capsid.versions/1`: this node's (or, if it holds none, another's)
  # versions, and under `:nodes` the version each node runs.
  def versions(name) do
    case remote_nodes(name) do
      [] ->
        Deployment.call_server(name, :versions) |> with_nodes()

      remote ->
        local = {node(), Deployment.call_server(name, :versions)}

        answers =
          Enum.zip(
            remote,
            :erpc.multicall(remote, Deployment, :call_server, [name, :versions], @query_timeout)
          )
          |> Enum.map(fn
            {n, {:ok, result}} -> {n, result}
            {n, _} -> {n, {:error, :unreachable}}
          end)

        summarize([local | answers])
    end
  end

  @doc false
  # A result of this node alone, with the `:nodes` a cluster-wide one has.
  def with_nodes({:ok, info}), do: {:ok, Map.put(info, :nodes, %{node() => summary(info)})}
  def with_nodes(error), do: error

  defp summarize(answers) do
    served = for {n, {:ok, info}} <- answers, do: {n, info}

    case served do
      [] ->
        {:error, Error.new(:instance_down, "no node serves it")}

      [{_, first} | _] ->
        base = Keyword.get(served, node(), first)
        {:ok, Map.put(base, :nodes, Map.new(served, fn {n, info} -> {n, summary(info)} end))}
    end
  end

  defp summary(%{current: current, previous: previous}) do
    %{
      version: current.version,
      hash: current.hash,
      previous: previous && previous.hash
    }
  end

  defp nodes!(:all), do: Enum.sort([node() | Node.list()])

  defp nodes!(nodes) when is_list(nodes) and nodes != [] do
    unless Enum.all?(nodes, &is_atom/1) do
      raise ArgumentError,
            "invalid value for :nodes: expected a non-empty list of node names or :all, got #{inspect(nodes)}"
    end

    Enum.uniq(nodes)
  end

  defp nodes!(other) do
    raise ArgumentError,
          "invalid value for :nodes: expected a non-empty list of node names or :all, got #{inspect(other)}"
  end

  # The bytes, read as `Capsid.Component.load/2` reads them (regular files
  # only, size-capped).
  defp bytes(%Component{bytes: bytes}) when is_binary(bytes), do: {:ok, bytes}
  defp bytes(source) when is_binary(source), do: Component.read(source)

  defp bytes(other) do
    {:error,
     Error.new(
       :invalid_component,
       "expected a path, the component's bytes or a Capsid.Component, got #{inspect(other, limit: 5)}"
     )}
  end

  # The four steps, under a lock on the name across the nodes involved.
  defp across(name, kind, nodes, job) do
    t0 = System.monotonic_time()

    result =
      case unready(nodes) do
        [] ->
          lock = {{__MODULE__, name}, self()}
          :global.trans(lock, fn -> steps(name, kind, nodes, job) end, [node() | nodes])

        problems ->
          {:error,
           Error.new(
             :instance_down,
             Enum.map_join(problems, "; ", fn {n, why} -> "#{n}: #{why}" end) <>
               " (no node changed)"
           )}
      end

    duration = System.monotonic_time() - t0

    event = if kind == :swap, do: :deploy, else: :rollback

    Telemetry.execute([:capsid, :cluster, event], %{duration: duration}, %{
      name: name,
      nodes: nodes,
      hash: job.hash,
      result: if(match?({:ok, _}, result), do: :ok, else: result)
    })

    with {:ok, info} <- result do
      {:ok, Map.put(info, :duration_us, System.convert_time_unit(duration, :native, :microsecond))}
    end
  end

  # Nodes that cannot take part: not reachable, or without Capsid's code.
  defp unready(nodes) do
    {reachable, unreachable} = Enum.split_with(nodes, &(&1 == node() or Node.connect(&1) == true))
    loaded = :erpc.multicall(reachable, :code, :ensure_loaded, [__MODULE__], @query_timeout)

    missing =
      for {n, answer} <- Enum.zip(reachable, loaded),
          answer != {:ok, {:module, __MODULE__}},
          do: {n, "Capsid's code is not loaded there"}

    Enum.map(unreachable, &{&1, "cannot be reached"}) ++ missing
  end

  defp steps(name, kind, nodes, job) do
    ref = make_ref()
    args = [self(), ref, name, kind, job.hash, job.source, job.opts]

    agents =
      Map.new(nodes, fn n ->
        # Spawned and monitored at once: an agent that dies at birth
        # (Capsid's code missing there) tells why.
        {pid, monitor} = :erlang.spawn_monitor(n, __MODULE__, :agent, args)
        {pid, %{node: n, monitor: monitor}}
      end)

    try do
      with {:ok, loaded, agents} <- phase(agents, ref, :load, job.bytes),
           :ok <- compatible(loaded, kind, job.opts, agents),
           {:ok, _, agents} <- phase(agents, ref, :prepare, nil) do
        commit(name, agents, ref, loaded)
      else
        {:error, problems, _, alive} ->
          # Only the agents still alive are told (a dead one never answers).
          phase(alive, ref, :abort, nil)
          {:error, failure(problems, kind)}
      end
    after
      for {_, %{monitor: m}} <- agents, do: Process.demonitor(m, [:flush])
    end
  end

  # Sends `step` to every agent and collects their answers: `{:ok, %{node
  # => answer}, agents}`, or `{:error, [{node, error}], %{node => answer},
  # agents}` if any failed; `agents` without those that died meanwhile.
  defp phase(agents, ref, step, bytes) do
    for {pid, _} <- agents, do: send(pid, {ref, step})
    collect(agents, ref, bytes, Map.new(agents, fn {pid, a} -> {pid, a.node} end), %{}, [])
  end

  defp collect(agents, _ref, _bytes, waiting, done, errors) when waiting == %{} do
    if errors == [], do: {:ok, done, agents}, else: {:error, Enum.reverse(errors), done, agents}
  end

  defp collect(agents, ref, bytes, waiting, done, errors) do
    receive do
      {^ref, pid, :need_bytes} when is_map_key(waiting, pid) ->
        send(pid, {ref, :bytes, bytes})
        collect(agents, ref, bytes, waiting, done, errors)

      {^ref, pid, {:error, error}} when is_map_key(waiting, pid) ->
        {node, waiting} = Map.pop(waiting, pid)
        collect(agents, ref, bytes, waiting, done, [{node, error} | errors])

      {^ref, pid, {:ok, answer}} when is_map_key(waiting, pid) ->
        {node, waiting} = Map.pop(waiting, pid)
        collect(agents, ref, bytes, waiting, Map.put(done, node, answer), errors)

      {:DOWN, _, :process, pid, reason} when is_map_key(waiting, pid) ->
        {node, waiting} = Map.pop(waiting, pid)
        error = Error.new(:instance_down, "the node went down, or its agent failed: #{why(reason)}")
        agents = Map.delete(agents, pid)
        collect(agents, ref, bytes, waiting, done, [{node, error} | errors])
    end
  end

  # The compatibility check, once: the new version against every version
  # the nodes run now (they may differ, e.g. a node that joined late).
  defp compatible(_loaded, :rollback, _opts, _agents), do: :ok

  defp compatible(loaded, :swap, opts, agents) do
    if Keyword.get(opts, :force, false) do
      :ok
    else
      new = loaded |> Map.values() |> hd() |> Map.fetch!(:new)

      problems =
        loaded
        |> Enum.filter(fn {_, answer} -> answer.old != nil end)
        |> Enum.uniq_by(fn {_, answer} -> answer.old.hash end)
        |> Enum.flat_map(fn {node, answer} ->
          case Deployment.incompatibilities(answer.old, new) do
            [] -> []
            list -> [{node, Enum.join(list, "; ")}]
          end
        end)

      if problems == [] do
        :ok
      else
        errors =
          for {node, text} <- problems do
            {node,
             Error.new(
               :incompatible,
               "the new version is not compatible with the running one (pass force: true to deploy anyway): " <>
                 text
             )}
          end

        {:error, errors, %{}, agents}
      end
    end
  end

  defp why(:noconnection), do: "no connection"
  defp why({:undef, [{__MODULE__, :agent, _, _} | _]}), do: "Capsid's code is not loaded there"
  defp why(reason), do: inspect(reason, limit: 10)

  defp failure(problems, kind) do
    [{_, first} | _] = problems
    what = if kind == :rollback, do: "rollback", else: "upgrade"

    Error.new(
      first.kind,
      Enum.map_join(problems, "; ", fn {node, e} -> "#{node}: #{Exception.message(e)}" end) <>
        " (no node switched: the whole #{what} was abandoned)"
    )
  end

  # Every node switches; one that goes down meanwhile is reported, the
  # others serve the new version when this returns.
  defp commit(name, agents, ref, loaded) do
    {done, lost} =
      case phase(agents, ref, :commit, nil) do
        {:ok, done, _} -> {done, []}
        {:error, problems, done, _} -> {done, Enum.map(problems, &elem(&1, 0))}
      end

    case done do
      empty when empty == %{} ->
        {:error,
         Error.new(:instance_down, "every node was lost during the switch of #{inspect(name)}")}

      done ->
        settle(name, done)
        {:ok, base} = summarize(Enum.map(done, fn {n, info} -> {n, {:ok, info}} end))
        loaded = Map.new(loaded, fn {n, answer} -> {n, answer.loaded} end)
        {:ok, base |> Map.put(:lost, lost) |> Map.put(:loaded, loaded)}
    end
  end

  # The membership travels on its own path (each node's :pg scope process),
  # so this node may not know yet what the agents just answered: wait until
  # it does, so that a call made here right after `deploy` returns finds
  # the new nodes. Bounded: a node lost meanwhile is not waited for.
  @settle_ms 5_000

  defp settle(name, done) do
    deadline = System.monotonic_time(:millisecond) + @settle_ms
    settle(name, Map.new(done, fn {n, info} -> {n, info.current.hash} end), deadline)
  end

  defp settle(name, expected, deadline) do
    cond do
      Enum.all?(expected, fn {n, hash} -> serves?(name, n, hash) end) ->
        :ok

      System.monotonic_time(:millisecond) > deadline ->
        :ok

      true ->
        Process.sleep(1)
        settle(name, expected, deadline)
    end
  end

  defp serves?(name, node, hash) do
    :pg.get_members(@scope, {:version, name, hash}) |> Enum.any?(&(node(&1) == node))
  end

  ## The agent: one per node and cluster-wide deploy

  @doc false
  # Runs on each node of a cluster-wide deploy, driven by the coordinator's
  # messages (`:load`, `:prepare`, `:commit`, `:abort`); exits with it.
  def agent(coordinator, ref, name, kind, hash, source, opts) do
    Process.monitor(coordinator)
    # A node that has Capsid's code but has not started it yet.
    {:ok, _} = Application.ensure_all_started(:capsid)
    await(coordinator, ref, %{name: name, kind: kind, hash: hash, source: source, opts: opts})
  end

  @agent_patience 600_000

  defp await(coordinator, ref, job) do
    receive do
      {^ref, :load} ->
        answer = load(coordinator, ref, job)
        reply(coordinator, ref, answer)

        case answer do
          {:ok, loaded} -> await(coordinator, ref, Map.put(job, :component, loaded.component))
          {:error, _} -> await(coordinator, ref, job)
        end

      {^ref, :prepare} ->
        answer = prepare(job)
        reply(coordinator, ref, answer)

        case answer do
          {:ok, deployment} -> await(coordinator, ref, Map.put(job, :deployment, deployment))
          {:error, _} -> await(coordinator, ref, job)
        end

      {^ref, :commit} ->
        reply(coordinator, ref, commit_here(job))

      {^ref, :abort} ->
        with %{deployment: {pid, _}} <- job, do: deployment_call(pid, {:abort, self()})
        reply(coordinator, ref, {:ok, :aborted})

      {:DOWN, _, :process, ^coordinator, _} ->
        # The deployment notices this agent's exit and drops what it prepared.
        :ok
    after
      @agent_patience -> :ok
    end
  end

  defp reply(coordinator, ref, answer) do
    send(coordinator, {ref, self(), strip(answer)})
  end

  # What goes back to the coordinator: no component resource.
  defp strip({:ok, %{component: _} = loaded}), do: {:ok, Map.delete(loaded, :component)}
  defp strip({:ok, {_pid, how}}), do: {:ok, how}
  defp strip(other), do: other

  defp load(_coordinator, _ref, %{kind: :rollback} = job) do
    case Registry.recall_deployment(job.name) do
      %{previous: %{component: previous}} when previous != nil ->
        {:ok, %{component: nil, old: nil, new: Map.take(previous, [:hash]), loaded: :held}}

      %{} ->
        {:error, Error.new(:not_found, "no previous version to roll back to")}

      nil ->
        {:error, Error.new(:instance_down, "this node does not hold #{inspect(job.name)}")}
    end
  end

  defp load(coordinator, ref, job) do
    with {:ok, component, loaded} <- component(coordinator, ref, job) do
      old =
        case Registry.recall_deployment(job.name) do
          %{current: %{component: c}} -> %{hash: c.hash, exports: c.exports}
          nil -> nil
        end

      {:ok,
       %{
         component: component,
         old: old,
         new: %{hash: component.hash, exports: component.exports},
         loaded: loaded
       }}
    end
  end

  # The component by its hash: one this node holds already, or the bytes
  # (asked for once) loaded through the disk cache.
  defp component(coordinator, ref, job) do
    case Registry.component(job.hash, Component.flavor!(job.opts)) do
      %Component{} = component ->
        {:ok, component, :held}

      nil ->
        send(coordinator, {ref, self(), :need_bytes})

        receive do
          {^ref, :bytes, bytes} ->
            with {:ok, c} <- Component.load(bytes, Keyword.take(job.opts, Deployment.load_keys())),
                 do: {:ok, c, c.cache}

          {:DOWN, _, :process, ^coordinator, _} ->
            exit(:normal)
        end
    end
  end

  defp prepare(job) do
    case Deployment.whereis(job.name) do
      nil when job.kind == :swap ->
        case Deployment.start_pending(job.name, job.component, job.source, job.opts, self()) do
          {:ok, pid} -> {:ok, {pid, :started}}
          {:error, reason} -> {:error, Deployment.unwrap(reason)}
        end

      nil ->
        {:error, Error.new(:instance_down, "this node no longer holds #{inspect(job.name)}")}

      pid ->
        request = {:prepare, self(), job.kind, job[:component], job.source, job.opts}

        case deployment_call(pid, request) do
          {:ok, how} -> {:ok, {pid, how}}
          {:error, _} = error -> error
        end
    end
  end

  defp commit_here(%{deployment: {pid, :unchanged}}), do: deployment_call(pid, :versions)
  defp commit_here(%{deployment: {pid, _}}), do: deployment_call(pid, {:commit, self()})

  defp deployment_call(pid, request) do
    GenServer.call(pid, request, :infinity)
  catch
    :exit, reason ->
      {:error, Error.new(:instance_down, "the deployment stopped (#{inspect(reason)})")}
  end
end
