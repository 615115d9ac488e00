%% Calling Capsid from Erlang, with the example component `toolkit`
%% (guest/toolkit, its WIT in wit/toolkit/toolkit.wit).
%%
%% In a shell where Capsid is loaded (for example `iex -S mix` in Capsid's
%% repository), compile and run it:
%%
%%   iex> :c.c(~c"examples/erlang/capsid_example.erl")
%%   iex> :capsid_example.run("priv/guests/toolkit.wasm")
%%
%% Capsid's test suite runs it: test/capsid/erlang_example_test.exs.
-module(capsid_example).
-export([run/1]).

run(Path) ->
    %% Elixir modules are the atoms 'Elixir.Capsid...'. A path or the wasm
    %% bytes; an Elixir string is a binary, an Erlang string works as a path.
    {ok, Component} = 'Elixir.Capsid.Component':load(Path),

    %% Options are proplists (Elixir keyword lists). Imports are a map from
    %% the WIT name, a binary, to a fun of the same arity; `nil` is WIT's
    %% `none`, an enum case is an atom (`info`).
    Self = self(),
    Imports = #{
        <<"log">> => fun(Level, Message) -> Self ! {guest_log, Level, Message} end,
        <<"get-config">> => fun(<<"greeting">>) -> <<"Howdy">>;
                               (_Key) -> nil
                            end
    },
    {ok, Instance} = 'Elixir.Capsid.Instance':start_link(
        [{component, Component}, {imports, Imports}, {fuel, 10000000}, {timeout, 1000}]),

    %% Function names and strings are binaries; arguments are a list.
    {ok, 3} = 'Elixir.Capsid':call(Instance, <<"add">>, [1, 2]),
    {ok, <<"Howdy, Ada!">>} = 'Elixir.Capsid':call(Instance, <<"greet">>, [<<"Ada">>]),
    receive {guest_log, info, <<"greeted Ada">>} -> ok after 1000 -> error(no_log) end,
    {ok, <<"creme-brulee">>} =
        'Elixir.Capsid':call(Instance, <<"acme:toolkit/text#slugify">>, [<<"Crème Brûlée"/utf8>>]),

    %% A record is a map with atom keys, kebab-case turned to snake_case.
    {ok, #{words := 3, longest_word := <<"hello">>}} =
        'Elixir.Capsid':call(Instance, <<"analyze">>, [<<"hello big world">>]),

    %% option<T>: `nil` or the value. A guest's own result<T, E> comes
    %% inside the host's {ok, _}.
    {ok, nil} = 'Elixir.Capsid':call(Instance, <<"echo-option">>, [nil]),
    {ok, 7} = 'Elixir.Capsid':call(Instance, <<"echo-option">>, [7]),
    {ok, {error, <<"division by zero">>}} = 'Elixir.Capsid':call(Instance, <<"divide">>, [1, 0]),

    %% Host errors are Elixir exceptions: maps with '__struct__', kind and
    %% message. 'Elixir.Exception':message/1 formats one.
    {error, #{'__struct__' := 'Elixir.Capsid.Error', kind := bad_argument,
              message := <<"args[1]: expected s32, got \"2\"">>} = Error} =
        'Elixir.Capsid':call(Instance, <<"add">>, [1, <<"2">>]),
    <<"(bad_argument) args[1]: expected s32, got \"2\"">> = 'Elixir.Exception':message(Error),

    %% The `!` functions raise them instead (class error).
    unknown_function =
        try 'Elixir.Capsid':'call!'(Instance, <<"no-such-function">>, [])
        catch error:#{'__struct__' := 'Elixir.Capsid.Error', kind := Kind} -> Kind
        end,

    %% Per-call options narrow the instance's limits; a trap is an error too.
    {error, #{'__struct__' := 'Elixir.Capsid.Trap', kind := out_of_fuel}} =
        'Elixir.Capsid':call(Instance, <<"acme:toolkit/text#word-frequencies">>,
                             [binary:copy(<<"lorem ipsum ">>, 1000), 3], [{fuel, 1000}]),

    %% Exported functions, with their WIT types as atoms and tuples.
    Exports = 'Elixir.Capsid.Component':exports(Component),
    #{params := [{<<"a">>, s32}, {<<"b">>, s32}], result := s32} =
        hd([F || #{name := <<"add">>} = F <- Exports]),

    ok = gen_server:stop(Instance),

    %% A deployment: a named, supervised set of instances that can be
    %% upgraded in place (Capsid.deploy/3 again) and rolled back.
    {ok, #{}} = 'Elixir.Capsid':deploy(capsid_example, Path, [{size, 1}, {imports, Imports}]),
    {ok, 5} = 'Elixir.Capsid':call(capsid_example, <<"add">>, [2, 3]),
    ok = 'Elixir.Capsid':undeploy(capsid_example).
